//! Capped, jittered exponential backoff for reconnects.

use std::time::Duration;

/// First retry delay.
pub const BASE: Duration = Duration::from_millis(500);
/// No delay exceeds this, so an agent is back within 30 s of the coordinator returning.
pub const CAP: Duration = Duration::from_secs(30);

/// Reconnect delays: doubling from [`BASE`] up to [`CAP`], each drawn uniformly from the
/// upper half of the current step ("equal jitter"), so a fleet that lost its coordinator at
/// the same instant does not return in lockstep.
#[derive(Debug)]
pub struct Backoff {
    step: Duration,
    base: Duration,
    cap: Duration,
    jitter: fn() -> f64,
}

impl Backoff {
    /// The production schedule, with random jitter.
    pub fn new() -> Self {
        Self::with_jitter(BASE, CAP, rand::random::<f64>)
    }

    /// A schedule with an injected jitter source returning values in `[0, 1)`.
    pub fn with_jitter(base: Duration, cap: Duration, jitter: fn() -> f64) -> Self {
        Self {
            step: base,
            base,
            cap,
            jitter,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.cap);
        let half = step / 2;
        half + half.mul_f64((self.jitter)().clamp(0.0, 1.0))
    }

    /// Back to the first step, after a connection that worked.
    pub fn reset(&mut self) {
        self.step = self.base;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_stay_under_the_cap_and_reset() {
        let mut max = Backoff::with_jitter(BASE, CAP, || 0.999_999);
        let delays: Vec<_> = (0..10).map(|_| max.next_delay()).collect();
        assert!(delays[0] <= BASE);
        assert!(delays[1] > delays[0]);
        assert!(delays.iter().all(|d| *d <= CAP));
        assert!(delays[9] > CAP / 2, "reaches the cap");
        max.reset();
        assert!(max.next_delay() <= BASE);

        let mut min = Backoff::with_jitter(BASE, CAP, || 0.0);
        assert_eq!(
            min.next_delay(),
            BASE / 2,
            "jitter never goes below half the step"
        );
    }
}
