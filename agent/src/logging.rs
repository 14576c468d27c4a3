//! Where the agent's log lines go: the systemd journal when systemd started the agent
//! (`JOURNAL_STREAM` is set), stderr otherwise.
//!
//! The agent logs through the `log` crate. tonic, hyper and h2 emit `tracing` events; the
//! `tracing` crate's `log` feature turns them into `log` records because the agent installs
//! no tracing subscriber, so they reach the same place.

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};

/// Noisy transport crates log at `warn` and above unless the level is `trace`.
const TRANSPORT_TARGETS: &[&str] = &["h2", "hyper", "tower", "rustls", "tokio_util"];

/// Installs the logger. `level` comes from `HOMELAB_AGENT_LOG` (error, warn, info, debug,
/// trace); default info.
pub fn init(level: Option<&str>) {
    let level = level
        .and_then(|l| l.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Info);
    let installed = if systemd_journal_logger::connected_to_journal() {
        systemd_journal_logger::JournalLog::new()
            .map(|journal| {
                journal
                    .with_syslog_identifier("homelab-agent".to_owned())
                    .install()
                    .is_ok()
            })
            .unwrap_or(false)
    } else {
        false
    };
    if !installed {
        let _ = log::set_boxed_logger(Box::new(StderrLogger { level }));
    }
    log::set_max_level(level);
}

struct StderrLogger {
    level: LevelFilter,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        let transport = TRANSPORT_TARGETS
            .iter()
            .any(|t| metadata.target().starts_with(t));
        if transport && self.level < LevelFilter::Trace {
            metadata.level() <= log::Level::Warn
        } else {
            metadata.level() <= self.level
        }
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut err = std::io::stderr().lock();
        let _ = writeln!(
            err,
            "{:<5} {}: {}",
            record.level(),
            record.target(),
            record.args()
        );
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}
