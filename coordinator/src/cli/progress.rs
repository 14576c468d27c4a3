//! Per-node progress for `homelab up` and `homelab demo`.
//!
//! A [`Board`] holds, for each node of the spec, how far it has got: its phase, the step it is
//! in, how often that step started and its last error. It learns from two sources, the
//! provisioner's progress (clone, seed, upload, configure, power) and the coordinator's event
//! log (enrolled, connected, assigned, install steps, Ready). [`Display`] shows it in one of
//! three ways:
//!
//! - on a terminal (table output, stdout a TTY): a live board, one line per node, redrawn in
//!   place on every change and every second ([`board_lines`], a pure function);
//! - otherwise: one plain line per change of a node's phase, step, attempt or error
//!   ([`plain_line`]), prefixed with the time since the command started;
//! - with `--output json`: every event and provisioner step as one JSON object per line.

use std::{
    fmt,
    io::{IsTerminal as _, Write as _},
    time::Duration,
};

use homelab_proto::v1 as pb;
use serde_json::json;
use tokio::time::Instant;

use super::OutputFormat;
use crate::{orchestrate::DesiredNode, provision::Progress};

/// How far a node has got, in the order a node normally goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Phase {
    /// Nothing known yet.
    Waiting,
    /// Its VM is being cloned, seeded, configured or started.
    Provisioning,
    /// Its VM exists; its agent has not enrolled yet.
    Booting,
    /// Its agent enrolled with its one-time token.
    Enrolled,
    /// Its agent is connected over mTLS.
    Connected,
    /// It has its K3s role.
    Assigned,
    /// Its agent runs the K3s install steps.
    Installing,
    /// K3s is installed and started; a server does not see the Node Ready (yet).
    Running,
    /// A server sees the Node Ready.
    Ready,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Provisioning => "provisioning",
            Self::Booting => "booting",
            Self::Enrolled => "enrolled",
            Self::Connected => "connected",
            Self::Assigned => "assigned",
            Self::Installing => "installing",
            Self::Running => "running",
            Self::Ready => "ready",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One node's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NodeProgress {
    pub name: String,
    pub role: String,
    pub ip: String,
    pub phase: Phase,
    /// What it does within the phase, in words ("clone: cloning template 9000 to VMID 101",
    /// "run-installer").
    pub step: String,
    /// How often the current install step started during this run (1 for the first try).
    pub attempt: u32,
    /// The last failure, until a step succeeds.
    pub error: Option<String>,
    /// Whether its agent's link is down after it was up.
    pub disconnected: bool,
    /// When this run first heard of the node, since the start.
    pub first_at: Option<Duration>,
    /// When what it shows last changed, since the start.
    pub changed_at: Option<Duration>,
    /// Install steps started during this run, for the attempt count.
    starts: Vec<String>,
}

impl NodeProgress {
    fn new(name: &str, role: &str, ip: &str) -> Self {
        Self {
            name: name.to_owned(),
            role: role.to_owned(),
            ip: ip.to_owned(),
            phase: Phase::Waiting,
            step: String::new(),
            attempt: 0,
            error: None,
            disconnected: false,
            first_at: None,
            changed_at: None,
            starts: Vec::new(),
        }
    }

    /// Moves forward to `phase` (never back) with `step`. Returns whether it moved.
    fn advance(&mut self, phase: Phase, step: &str) -> bool {
        if phase < self.phase {
            return false;
        }
        self.set(phase, step);
        true
    }

    fn set(&mut self, phase: Phase, step: &str) {
        if phase != Phase::Installing {
            self.attempt = 0;
        }
        self.phase = phase;
        step.clone_into(&mut self.step);
    }

    /// What changes a plain line: everything shown but the times.
    fn key(&self) -> (Phase, &str, u32, Option<&str>, bool) {
        (
            self.phase,
            &self.step,
            self.attempt,
            self.error.as_deref(),
            self.disconnected,
        )
    }

    /// The step, attempt, error and link in words.
    fn detail(&self) -> String {
        let mut text = self.step.clone();
        if self.attempt > 1 {
            text.push_str(&format!(" (attempt {})", self.attempt));
        }
        if let Some(error) = &self.error {
            if !text.is_empty() {
                text.push_str("; ");
            }
            text.push_str("last error: ");
            text.push_str(error);
        }
        if self.disconnected {
            if !text.is_empty() {
                text.push_str("; ");
            }
            text.push_str("agent disconnected");
        }
        text
    }
}

/// What the board heard.
#[derive(Debug)]
pub(super) enum Update<'a> {
    /// A step of the provisioner.
    Vm(&'a Progress),
    /// An event from the coordinator's log.
    Event(&'a pb::Event),
    /// The provisioner finished: every VM exists and was started.
    Applied,
    /// The coordinator's record of a node, at the start.
    Known(&'a pb::Node),
}

/// The progress of every node of the spec, in spec order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Board {
    pub nodes: Vec<NodeProgress>,
}

/// What a node does once its VM runs, until its agent calls home.
const BOOTING: &str = "VM started; waiting for its agent to enroll";

impl Board {
    pub(super) fn new(nodes: &[DesiredNode]) -> Self {
        Self {
            nodes: nodes
                .iter()
                .map(|n| NodeProgress::new(&n.name, n.role.as_str(), &n.ip.to_string()))
                .collect(),
        }
    }

    /// Applies `update` at `at` (since the start). Returns the indexes of the nodes whose
    /// shown state changed.
    pub(super) fn apply(&mut self, at: Duration, update: &Update<'_>) -> Vec<usize> {
        let mut changed = Vec::new();
        let targets: Vec<usize> = match update {
            Update::Vm(p) => self.index(&p.vm).into_iter().collect(),
            Update::Event(e) => self.index(&e.node).into_iter().collect(),
            Update::Known(n) => self.index(&n.name).into_iter().collect(),
            Update::Applied => (0..self.nodes.len()).collect(),
        };
        for i in targets {
            let node = &mut self.nodes[i];
            let before = (
                node.phase,
                node.step.clone(),
                node.attempt,
                node.error.clone(),
                node.disconnected,
            );
            let touched = match update {
                Update::Vm(p) => vm_step(node, p),
                Update::Event(e) => event(node, e),
                Update::Applied => node.advance(Phase::Booting, BOOTING),
                Update::Known(n) => known(node, n),
            };
            if touched && node.first_at.is_none() {
                node.first_at = Some(at);
            }
            let (phase, step, attempt, error, disconnected) = node.key();
            if (phase, step, attempt, error, disconnected)
                != (
                    before.0,
                    before.1.as_str(),
                    before.2,
                    before.3.as_deref(),
                    before.4,
                )
            {
                node.changed_at = Some(at);
                changed.push(i);
            }
        }
        changed
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }
}

/// A provisioner step. Only steps before the agent calls home show: later ones (removing the
/// seed once the node enrolled) do not change how far the node is.
fn vm_step(node: &mut NodeProgress, p: &Progress) -> bool {
    if node.phase > Phase::Provisioning {
        return false;
    }
    match p.step {
        "created" => node.advance(Phase::Booting, BOOTING),
        step => node.advance(Phase::Provisioning, &format!("{step}: {}", p.message)),
    }
}

/// An event of the node. Progress moves forward only, except that an install started again
/// (a retry or a new revision) and a Ready node seen NotReady move back: both are news.
fn event(node: &mut NodeProgress, e: &pb::Event) -> bool {
    match e.kind.as_str() {
        "node.enrolled" => node.advance(Phase::Enrolled, "certificate issued; connecting"),
        "node.connected" => {
            node.disconnected = false;
            node.advance(Phase::Connected, "waiting for its role")
        }
        "node.disconnected" => {
            node.disconnected = true;
            true
        }
        "node.assigned" => {
            // "role server (revision 1)"
            if let Some(role) = e
                .message
                .strip_prefix("role ")
                .and_then(|r| r.split_whitespace().next())
            {
                role.clone_into(&mut node.role);
            }
            node.advance(Phase::Assigned, &format!("role {}", node.role))
        }
        "node.phase" => phase_report(node, &e.message),
        "node.ready" => {
            node.set(Phase::Ready, &e.message);
            true
        }
        "node.not_ready" if node.phase == Phase::Ready => {
            node.set(Phase::Running, &e.message);
            true
        }
        kind if kind.starts_with("enroll.")
            || matches!(
                kind,
                "node.link_refused" | "node.duplicate_identity" | "node.revoked"
            ) =>
        {
            node.error = Some(format!("{kind}: {}", e.message));
            true
        }
        _ => false,
    }
}

/// A `node.phase` event: "PHASE / STEP: OUTCOME[: MESSAGE]".
fn phase_report(node: &mut NodeProgress, message: &str) -> bool {
    let Some((phase, rest)) = message.split_once(" / ") else {
        return false;
    };
    let Some((step, rest)) = rest.split_once(": ") else {
        return false;
    };
    let (outcome, text) = rest.split_once(": ").unwrap_or((rest, ""));
    match (phase, outcome) {
        ("install", "started") => {
            node.starts.push(step.to_owned());
            let attempt = node.starts.iter().filter(|s| *s == step).count();
            node.set(Phase::Installing, step);
            node.attempt = u32::try_from(attempt).unwrap_or(u32::MAX);
            true
        }
        ("install", "succeeded") => {
            node.error = None;
            // A node a server already saw (Ready, or NotReady since) keeps what it showed.
            if step == "start" && node.phase < Phase::Running {
                node.set(Phase::Running, "K3s started; waiting for Ready");
            }
            true
        }
        (_, "failed") => {
            node.error = Some(if text.is_empty() {
                format!("{phase}/{step} failed")
            } else {
                format!("{phase}/{step}: {text}")
            });
            true
        }
        _ => false,
    }
}

/// The coordinator's record at the start: how far a node got in an earlier run.
fn known(node: &mut NodeProgress, n: &pb::Node) -> bool {
    if !n.last_error.is_empty() {
        node.error = Some(n.last_error.clone());
    }
    if !n.role.is_empty() {
        n.role.clone_into(&mut node.role);
    }
    let install = n.last_phase.as_ref().filter(|p| p.phase == "install");
    let started = install
        .is_some_and(|p| p.step == "start" && p.outcome == pb::StepOutcome::Succeeded as i32);
    if n.ready {
        node.advance(Phase::Ready, "already Ready")
    } else if started {
        node.advance(Phase::Running, "K3s started; waiting for Ready")
    } else if let Some(p) = install {
        node.advance(Phase::Installing, &p.step)
    } else if !n.role.is_empty() && n.connected {
        node.advance(Phase::Assigned, &format!("role {}", n.role))
    } else if n.connected {
        node.advance(Phase::Connected, "waiting for its role")
    } else if n.state == pb::NodeState::Enrolled as i32 {
        node.advance(Phase::Enrolled, "agent not connected")
    } else {
        node.error.is_some()
    }
}

// ---- rendering --------------------------------------------------------------------------

/// A duration as `4.2s`, `1m05s` or `1h02m`.
pub(super) fn elapsed(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    }
}

/// One plain line for node `i` at `at`: `+12.3s  k3s-control  installing  run-installer`.
/// Names are padded to the longest node name, phases to the longest phase.
pub(super) fn plain_line(board: &Board, i: usize, at: Duration) -> String {
    let width = board.nodes.iter().map(|n| n.name.len()).max().unwrap_or(0);
    let node = &board.nodes[i];
    let line = format!(
        "{:>7}  {:<width$}  {:<12}  {}",
        format!("+{:.1}s", at.as_secs_f64()),
        node.name,
        node.phase.as_str(),
        node.detail()
    );
    line.trim_end().to_owned()
}

/// The live board at `now` (since the start): a header, then one line per node with its
/// name, role, phase, time since its first event (until it was done), step, attempt and last
/// error. Lines may be
/// longer than the terminal: [`Display`] turns off wrapping while it draws.
pub(super) fn board_lines(
    board: &Board,
    now: Duration,
    done: impl Fn(&NodeProgress) -> bool,
) -> Vec<String> {
    let total = board.nodes.len();
    let finished = board.nodes.iter().filter(|n| done(n)).count();
    let mut lines = vec![format!("{finished}/{total} nodes done  {}", elapsed(now))];
    let name_width = board.nodes.iter().map(|n| n.name.len()).max().unwrap_or(0);
    let role_width = board.nodes.iter().map(|n| n.role.len()).max().unwrap_or(0);
    for node in &board.nodes {
        // A node that is done shows how long it took.
        let until = match node.changed_at {
            Some(t) if done(node) => t,
            _ => now,
        };
        let since = node
            .first_at
            .map_or_else(|| "-".to_owned(), |t| elapsed(until.saturating_sub(t)));
        let mark = if done(node) {
            "✓"
        } else if node.error.is_some() {
            "!"
        } else {
            " "
        };
        let line = format!(
            "{mark} {:<name_width$}  {:<role_width$}  {:<12}  {since:>6}  {}",
            node.name,
            node.role,
            node.phase.as_str(),
            node.detail()
        );
        lines.push(line.trim_end().to_owned());
    }
    lines
}

// ---- output -----------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Live,
    Plain,
    Json,
}

/// Shows a [`Board`] as it changes, in the mode the output calls for.
pub(super) struct Display {
    board: Board,
    mode: Mode,
    start: Instant,
    /// How many lines the live board last drew.
    drawn: usize,
    /// When a node counts as done, for the header and its mark.
    done: fn(&NodeProgress) -> bool,
}

impl Display {
    /// A display for `nodes`: live when stdout is a terminal and the output is a table.
    pub(super) fn new(output: OutputFormat, nodes: &[DesiredNode]) -> Self {
        let mode = match output {
            OutputFormat::Json => Mode::Json,
            OutputFormat::Table if std::io::stdout().is_terminal() => Mode::Live,
            OutputFormat::Table => Mode::Plain,
        };
        Self {
            board: Board::new(nodes),
            mode,
            start: Instant::now(),
            drawn: 0,
            done: |n| n.phase == Phase::Ready,
        }
    }

    /// Counts nodes as done once K3s runs (clusters without a CNI stay NotReady).
    pub(super) fn done_when_running(&mut self) {
        self.done = |n| n.phase >= Phase::Running;
    }

    /// Whether every node shown is done.
    pub(super) fn all_done(&self) -> bool {
        self.board.nodes.iter().all(self.done)
    }

    pub(super) fn board(&self) -> &Board {
        &self.board
    }

    /// Prints `text` (table output only): above the live board, which is drawn again below.
    pub(super) fn note(&mut self, text: &str) {
        match self.mode {
            Mode::Json => {}
            Mode::Plain => println!("{text}"),
            Mode::Live => {
                let mut out = std::io::stdout().lock();
                if self.drawn > 0 {
                    let _ = write!(out, "\x1b[{}A\r\x1b[J", self.drawn);
                }
                let _ = writeln!(out, "{text}");
                drop(out);
                self.drawn = 0;
                self.draw();
            }
        }
    }

    /// The coordinator's records at the start.
    pub(super) fn known(&mut self, nodes: &[pb::Node]) {
        for n in nodes {
            self.update(&Update::Known(n));
        }
    }

    /// A provisioner step.
    pub(super) fn vm(&mut self, p: &Progress) {
        if self.mode == Mode::Json {
            print_json_line(&json!({
                "at_unix_ms": crate::core::now_unix_ms(),
                "node": p.vm,
                "kind": format!("vm.{}", p.step),
                "message": p.message,
            }));
        }
        self.update(&Update::Vm(p));
    }

    /// The provisioner finished.
    pub(super) fn applied(&mut self) {
        self.update(&Update::Applied);
    }

    /// An event of the coordinator's log (of a node of the spec, or cluster-wide).
    pub(super) fn event(&mut self, e: &pb::Event) {
        if self.mode == Mode::Json {
            print_json_line(&json!({
                "id": e.id, "at_unix_ms": e.at_unix_ms, "node": e.node,
                "kind": e.kind, "message": e.message,
            }));
        }
        self.update(&Update::Event(e));
    }

    /// Redraws the live board (its times move on).
    pub(super) fn tick(&mut self) {
        if self.mode == Mode::Live {
            self.draw();
        }
    }

    /// Draws the board a last time and leaves it on the screen.
    pub(super) fn finish(&mut self) {
        if self.mode == Mode::Live {
            self.draw();
            self.drawn = 0;
        }
    }

    fn update(&mut self, update: &Update<'_>) {
        let at = self.start.elapsed();
        let changed = self.board.apply(at, update);
        match self.mode {
            Mode::Live if !changed.is_empty() => self.draw(),
            Mode::Plain => {
                let mut out = std::io::stdout().lock();
                for i in changed {
                    let _ = writeln!(out, "{}", plain_line(&self.board, i, at));
                }
                let _ = out.flush();
            }
            _ => {}
        }
    }

    fn draw(&mut self) {
        let lines = board_lines(&self.board, self.start.elapsed(), self.done);
        let mut text = String::from("\x1b[?7l");
        if self.drawn > 0 {
            text.push_str(&format!("\x1b[{}A", self.drawn));
        }
        for line in &lines {
            text.push_str("\r\x1b[2K");
            text.push_str(line);
            text.push('\n');
        }
        text.push_str("\x1b[J\x1b[?7h");
        self.drawn = lines.len();
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

fn print_json_line(value: &serde_json::Value) {
    println!("{value}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Role;

    fn board() -> Board {
        Board::new(&[
            DesiredNode {
                name: "k3s-control".into(),
                role: Role::Server,
                ip: [192, 168, 0, 100].into(),
            },
            DesiredNode {
                name: "k3s-node-1".into(),
                role: Role::Agent,
                ip: [192, 168, 0, 101].into(),
            },
        ])
    }

    fn ev(node: &str, kind: &str, message: &str) -> pb::Event {
        pb::Event {
            id: 1,
            at_unix_ms: 0,
            node: node.into(),
            kind: kind.into(),
            message: message.into(),
        }
    }

    fn vm(node: &str, step: &'static str, message: &str) -> Progress {
        Progress {
            vm: node.into(),
            step,
            message: message.into(),
        }
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_node_goes_from_clone_to_ready_one_plain_line_per_change() {
        let mut b = board();
        let mut lines = Vec::new();
        let mut feed = |b: &mut Board, at: f64, u: Update<'_>| {
            for i in b.apply(secs(at), &u) {
                lines.push(plain_line(b, i, secs(at)));
            }
        };
        feed(
            &mut b,
            0.2,
            Update::Vm(&vm(
                "k3s-control",
                "clone",
                "cloning template 9000 to VMID 100",
            )),
        );
        feed(
            &mut b,
            1.3,
            Update::Vm(&vm("k3s-control", "created", "VMID 100 ready")),
        );
        feed(&mut b, 1.4, Update::Applied);
        feed(
            &mut b,
            2.0,
            Update::Event(&ev("k3s-control", "token.created", "x")),
        );
        feed(
            &mut b,
            3.0,
            Update::Event(&ev(
                "k3s-control",
                "node.enrolled",
                "enrolled (hostname k3s-control)",
            )),
        );
        feed(
            &mut b,
            3.1,
            Update::Event(&ev(
                "k3s-control",
                "node.connected",
                "agent link established",
            )),
        );
        feed(
            &mut b,
            3.1,
            Update::Event(&ev(
                "k3s-control",
                "node.assigned",
                "role server (revision 1)",
            )),
        );
        // The agent's idle report can arrive after the assignment: it moves nothing back.
        feed(
            &mut b,
            3.2,
            Update::Event(&ev(
                "k3s-control",
                "node.phase",
                "ready / waiting for a role: succeeded",
            )),
        );
        feed(
            &mut b,
            3.2,
            Update::Event(&ev("k3s-control", "node.health", "healthy: agent running")),
        );
        feed(
            &mut b,
            3.3,
            Update::Event(&ev("k3s-control", "node.phase", "install / start: started")),
        );
        feed(
            &mut b,
            4.0,
            Update::Event(&ev(
                "k3s-control",
                "node.phase",
                "install / start: failed: k3s did not become active within 60s",
            )),
        );
        feed(
            &mut b,
            4.5,
            Update::Event(&ev("k3s-control", "node.phase", "install / start: started")),
        );
        feed(
            &mut b,
            5.0,
            Update::Event(&ev(
                "k3s-control",
                "node.phase",
                "install / start: succeeded: k3s started",
            )),
        );
        feed(
            &mut b,
            5.5,
            Update::Event(&ev(
                "k3s-control",
                "node.ready",
                "Ready (seen by k3s-control)",
            )),
        );
        assert_eq!(
            lines,
            [
                "  +0.2s  k3s-control  provisioning  clone: cloning template 9000 to VMID 100",
                "  +1.3s  k3s-control  booting       VM started; waiting for its agent to enroll",
                "  +1.4s  k3s-node-1   booting       VM started; waiting for its agent to enroll",
                "  +3.0s  k3s-control  enrolled      certificate issued; connecting",
                "  +3.1s  k3s-control  connected     waiting for its role",
                "  +3.1s  k3s-control  assigned      role server",
                "  +3.3s  k3s-control  installing    start",
                "  +4.0s  k3s-control  installing    start; last error: install/start: k3s did not become active within 60s",
                "  +4.5s  k3s-control  installing    start (attempt 2); last error: install/start: k3s did not become active within 60s",
                "  +5.0s  k3s-control  running       K3s started; waiting for Ready",
                "  +5.5s  k3s-control  ready         Ready (seen by k3s-control)",
            ]
        );
        // The other node heard nothing but "applied", which is its first event.
        assert_eq!(b.nodes[1].phase, Phase::Booting);
        assert_eq!(b.nodes[1].first_at, Some(secs(1.4)));
    }

    #[test]
    fn a_ready_node_seen_not_ready_moves_back_and_an_enrollment_failure_is_its_error() {
        let mut b = board();
        b.apply(
            secs(1.0),
            &Update::Event(&ev(
                "k3s-node-1",
                "node.ready",
                "Ready (seen by k3s-control)",
            )),
        );
        let changed = b.apply(
            secs(2.0),
            &Update::Event(&ev(
                "k3s-node-1",
                "node.not_ready",
                "not Ready (seen by k3s-node-1)",
            )),
        );
        assert_eq!(changed, [1]);
        assert_eq!(b.nodes[1].phase, Phase::Running);
        // A node not Ready is not moved by not_ready.
        assert!(
            b.apply(
                secs(2.0),
                &Update::Event(&ev("k3s-control", "node.not_ready", "x"))
            )
            .is_empty()
        );
        b.apply(
            secs(3.0),
            &Update::Event(&ev(
                "k3s-control",
                "enroll.token_reused",
                "token already used",
            )),
        );
        assert_eq!(
            b.nodes[0].error.as_deref(),
            Some("enroll.token_reused: token already used")
        );
        // Events of nodes outside the spec change nothing.
        assert!(
            b.apply(secs(3.0), &Update::Event(&ev("other", "node.ready", "x")))
                .is_empty()
        );
    }

    #[test]
    fn known_records_resume_where_an_earlier_run_stopped() {
        let mut b = board();
        let ready = pb::Node {
            name: "k3s-control".into(),
            role: "server".into(),
            ready: true,
            ..Default::default()
        };
        let pending = pb::Node {
            name: "k3s-node-1".into(),
            state: pb::NodeState::Pending as i32,
            ..Default::default()
        };
        assert_eq!(b.apply(secs(0.0), &Update::Known(&ready)), [0]);
        assert!(b.apply(secs(0.0), &Update::Known(&pending)).is_empty());
        assert_eq!(b.nodes[0].phase, Phase::Ready);
        assert_eq!(b.nodes[1].phase, Phase::Waiting);
        // Provisioner steps after the agent called home do not show.
        assert!(
            b.apply(
                secs(1.0),
                &Update::Vm(&vm("k3s-control", "seed", "node enrolled: ejecting"))
            )
            .is_empty()
        );
    }

    #[test]
    fn the_board_shows_each_node_with_its_time_since_its_first_event() {
        let mut b = board();
        b.apply(
            secs(1.0),
            &Update::Vm(&vm(
                "k3s-control",
                "clone",
                "cloning template 9000 to VMID 100",
            )),
        );
        b.apply(
            secs(2.0),
            &Update::Event(&ev(
                "k3s-control",
                "node.phase",
                "install / run-installer: started",
            )),
        );
        b.apply(
            secs(2.5),
            &Update::Event(&ev(
                "k3s-control",
                "node.phase",
                "install / run-installer: failed: exit status 1",
            )),
        );
        b.apply(
            secs(3.0),
            &Update::Event(&ev(
                "k3s-control",
                "node.phase",
                "install / run-installer: started",
            )),
        );
        let lines = board_lines(&b, secs(75.0), |n| n.phase == Phase::Ready);
        assert_eq!(
            lines,
            [
                "0/2 nodes done  1m15s",
                "! k3s-control  server  installing     1m14s  run-installer (attempt 2); last error: install/run-installer: exit status 1",
                "  k3s-node-1   agent   waiting            -",
            ]
        );
        b.apply(
            secs(80.0),
            &Update::Event(&ev(
                "k3s-node-1",
                "node.ready",
                "Ready (seen by k3s-control)",
            )),
        );
        let lines = board_lines(&b, secs(82.0), |n| n.phase == Phase::Ready);
        assert_eq!(lines[0], "1/2 nodes done  1m22s");
        // Done: the time it took, which stops there.
        assert_eq!(
            lines[2],
            "✓ k3s-node-1   agent   ready           0.0s  Ready (seen by k3s-control)"
        );
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(elapsed(secs(4.25)), "4.2s");
        assert_eq!(elapsed(secs(65.0)), "1m05s");
        assert_eq!(elapsed(secs(3720.0)), "1h02m");
    }
}
