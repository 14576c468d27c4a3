//! The real-VM test: two Debian VMs under qemu boot from the seed ISOs that `homelab render`
//! makes, so real cloud-init installs the real `homelab-agent` and real systemd starts it. The
//! agents enroll over mTLS with the coordinator on the host, receive their roles, run the
//! (fake) K3s installer through systemd, and the cluster shows Ready in `homelab status`.
//!
//! Recipe and measurements: tests/vm/README.md. The guest image is built once by
//! `tests/vm/build-image.sh` (mmdebstrap, cached under `target/vm/image`). qemu uses TCG, or KVM
//! only where the CPU shows vmx/svm and KVM is not the paravirtual kind that cannot boot Linux.
//!
//! Networking is qemu's user mode with `restrict=on`: no packet leaves the host's loopback.
//! - Both VMs reach the coordinator at 10.0.2.100:7443, forwarded (`guestfwd`, through socat)
//!   to the coordinator's ephemeral port on 127.0.0.1.
//! - The worker reaches the server's (fake) K3s API at 10.0.2.15:6443, forwarded to a loopback
//!   port that the server VM's `hostfwd` maps to its port 6443.
//!
//! Every wait is bounded, the VMs are killed on drop, and their serial consoles (with the
//! journal forwarded to them) stay in `target/vm/runs/NAME/` for a failed run.

mod common;

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{CoordinatorProcess, bin, testdata};

/// How long two TCG VMs may take from power-on to a Ready cluster (measured: 65-145 s).
const READY_WITHIN: Duration = Duration::from_secs(540);
/// The address the guests dial for the coordinator (10.0.2.2 is slirp's own gateway).
const COORDINATOR_GUEST_ADDR: &str = "10.0.2.100";
const COORDINATOR_GUEST_PORT: u16 = 7443;
const SERVER: (&str, &str, &str) = ("k3s-control", "10.0.2.15", "52:54:00:4b:33:01");
const WORKER: (&str, &str, &str) = ("k3s-node-1", "10.0.2.16", "52:54:00:4b:33:02");

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the repository")
        .to_owned()
}

/// A port that is free on 127.0.0.1 right now (qemu binds it for `hostfwd`).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// KVM only where it can boot a normal Linux guest (see tests/vm/README.md).
fn accelerator() -> (&'static str, &'static str) {
    let writable = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let flags = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let virt = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let paravirtual = Path::new("/sys/module/kvm_pvm").exists();
    if writable && virt && !paravirtual {
        ("kvm", "host")
    } else {
        ("tcg", "max")
    }
}

/// One throw-away VM: a qcow2 overlay over the cached image, the seed as an IDE CD-ROM (as
/// Proxmox attaches it), one user-mode NIC at a fixed PCI slot (`enp0s3`).
struct Vm {
    name: &'static str,
    run: PathBuf,
    child: Option<Child>,
}

impl Vm {
    fn boot(name: &'static str, seed: &Path, mac: &str, forwards: &[String]) -> Vm {
        let root = repo_root();
        let image = root.join("target/vm/image");
        let run = root.join("target/vm/runs").join(name);
        let _ = fs::remove_dir_all(&run);
        fs::create_dir_all(&run).unwrap();
        let overlay = run.join("disk.qcow2");
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(image.join("image.raw"))
            .arg(&overlay)
            .status()
            .expect("qemu-img (tests/vm/setup-host.sh installs it)");
        assert!(status.success(), "qemu-img create failed for {name}");
        let (accel, cpu) = accelerator();
        fs::write(run.join("accel"), accel).unwrap();
        let mut netdev = "user,id=n0,restrict=on".to_owned();
        for forward in forwards {
            netdev.push(',');
            netdev.push_str(forward);
        }
        let stderr = fs::File::create(run.join("qemu.stderr")).unwrap();
        let child = Command::new("qemu-system-x86_64")
            .args(["-machine", &format!("q35,accel={accel}"), "-cpu", cpu])
            .args(["-m", "1024", "-smp", "1", "-nodefaults", "-no-reboot"])
            .args(["-display", "none", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", run.join("console.log").display()))
            .arg("-kernel")
            .arg(image.join("vmlinuz"))
            .arg("-initrd")
            .arg(image.join("initrd.img"))
            // The journal goes to the console too, so a failed run keeps the agent's log.
            .args([
                "-append",
                "root=/dev/vda rw console=ttyS0 systemd.journald.forward_to_console=1",
            ])
            .arg("-drive")
            .arg(format!(
                "file={},if=none,id=d0,format=qcow2",
                overlay.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=d0,addr=0x5"])
            .args(["-device", "piix3-ide,id=ide,addr=0x6"])
            .arg("-drive")
            .arg(format!(
                "file={},if=none,id=cd0,format=raw,media=cdrom,readonly=on",
                seed.display()
            ))
            .args(["-device", "ide-cd,drive=cd0,bus=ide.0"])
            .args(["-netdev", &netdev])
            .args([
                "-device",
                &format!("virtio-net-pci,netdev=n0,addr=0x3,mac={mac}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("qemu-system-x86_64 (tests/vm/setup-host.sh installs it)");
        Vm {
            name,
            run,
            child: Some(child),
        }
    }

    /// Why this VM can no longer make progress, if it cannot: qemu exited, or KVM failed (qemu
    /// then pauses the guest and never exits by itself).
    fn failure(&mut self) -> Option<String> {
        let stderr = fs::read_to_string(self.run.join("qemu.stderr")).unwrap_or_default();
        if stderr.contains("internal error") {
            return Some(format!("{}: KVM internal error", self.name));
        }
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(format!("{}: qemu exited early ({status})", self.name)),
            _ => None,
        }
    }

    fn console_tail(&self, lines: usize) -> String {
        let console = fs::read_to_string(self.run.join("console.log")).unwrap_or_default();
        let stderr = fs::read_to_string(self.run.join("qemu.stderr")).unwrap_or_default();
        let all: Vec<&str> = console.lines().collect();
        format!(
            "--- {} console (last {lines} lines of {}) ---\n{}\n--- qemu stderr ---\n{stderr}",
            self.name,
            self.run.join("console.log").display(),
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(self.run.join("disk.qcow2"));
    }
}

fn spec(dir: &Path, fake_installer: &Path) -> PathBuf {
    fs::write(
        dir.join("id.pub"),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG4x9kQzCxT5Tn2Z2b6T7hR2JwJxWQm0c1lq0f1p2r3s ops@workstation\n",
    )
    .unwrap();
    fs::write(dir.join("pve-token"), "never-used\n").unwrap();
    let text = format!(
        r#"# The real-VM test's cluster: no Proxmox is contacted (`render` only builds seeds).
[proxmox]
endpoint = "https://127.0.0.1:9"
node = "pve"
token_id = "homelab@pve!coordinator"
token_secret_file = "pve-token"
fingerprint = "{fingerprint}"
template = "ubuntu-noble"
iso_storage = "local"

[network]
cidr = "10.0.2.0/24"
gateway = "10.0.2.2"
dns = ["10.0.2.3"]

[access]
user = "ops"
ssh_public_key = "id.pub"
locale = "C.UTF-8"

[coordinator]
url = "https://{COORDINATOR_GUEST_ADDR}:{COORDINATOR_GUEST_PORT}"

[k3s]
version = "v1.31.4+k3s1"
installer_file = "{installer}"

[[vm]]
name = "{server}"
role = "server"
cores = 1
memory = 1024
ip = "{server_ip}"

[[vm]]
name = "{worker}"
role = "agent"
cores = 1
memory = 1024
ip = "{worker_ip}"
"#,
        fingerprint = ["AB"; 32].join(":"),
        installer = fake_installer.display(),
        server = SERVER.0,
        server_ip = SERVER.1,
        worker = WORKER.0,
        worker_ip = WORKER.1,
    );
    let path = dir.join("homelab.toml");
    fs::write(&path, text).unwrap();
    path
}

/// The debug agent without its debug info (about 100 MB less to read from a CD under TCG).
fn stripped_agent(dir: &Path) -> PathBuf {
    let out = dir.join("homelab-agent");
    let status = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(bin("homelab-agent"))
        .arg(&out)
        .status()
        .expect("objcopy (binutils)");
    assert!(status.success(), "objcopy --strip-debug failed");
    out
}

fn node<'a>(status: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    status["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == name)
}

#[test]
fn two_vms_boot_from_rendered_seeds_enroll_and_become_a_ready_cluster() {
    let root = repo_root();
    let started = Instant::now();
    let build = Command::new(root.join("tests/vm/build-image.sh"))
        .current_dir(&root)
        .output()
        .expect("tests/vm/build-image.sh");
    assert!(
        build.status.success(),
        "building the guest image failed (run tests/vm/setup-host.sh first):\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    eprintln!("vm: guest image ready after {:?}", started.elapsed());

    // The guests dial 10.0.2.100: the serving certificate must name it.
    let mut coordinator = CoordinatorProcess::init_with(
        &["--san", COORDINATOR_GUEST_ADDR],
        &["--health-interval", "5s"],
    );
    coordinator.start();
    let port = coordinator.address.unwrap().port();
    let dir = coordinator.dir.path().to_owned();
    let installer = dir.join("fake-install.sh");
    fs::copy(testdata("fake-install.sh"), &installer).unwrap();
    let spec = spec(&dir, &installer);
    let agent = stripped_agent(&dir);
    let mut seeds = Vec::new();
    for (name, _, mac) in [SERVER, WORKER] {
        let out_dir = dir.join("seeds").join(name);
        let out = coordinator.cli(&[
            "render",
            name,
            "--spec",
            spec.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
            "--mac",
            mac,
            "--agent-bin",
            agent.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "render {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        seeds.push(out_dir.join("seed.iso"));
    }

    let to_coordinator = format!(
        "guestfwd=tcp:{COORDINATOR_GUEST_ADDR}:{COORDINATOR_GUEST_PORT}-cmd:socat -lf {} - TCP:127.0.0.1:{port}",
        dir.join("socat.log").display()
    );
    let api_port = free_port();
    let booted = Instant::now();
    let mut vms = vec![
        Vm::boot(
            SERVER.0,
            &seeds[0],
            SERVER.2,
            &[
                to_coordinator.clone(),
                format!("hostfwd=tcp:127.0.0.1:{api_port}-{}:6443", SERVER.1),
            ],
        ),
        Vm::boot(
            WORKER.0,
            &seeds[1],
            WORKER.2,
            &[
                to_coordinator,
                format!(
                    "guestfwd=tcp:{}:6443-cmd:socat -lf {} - TCP:127.0.0.1:{api_port}",
                    SERVER.1,
                    dir.join("socat-api.log").display()
                ),
            ],
        ),
    ];
    eprintln!(
        "vm: booting {} and {} with {}",
        SERVER.0,
        WORKER.0,
        accelerator().0
    );

    let fail = |vms: &[Vm], why: String, coordinator: &CoordinatorProcess| -> ! {
        let consoles: Vec<String> = vms.iter().map(|vm| vm.console_tail(80)).collect();
        panic!(
            "{why}\n{}\n--- coordinator log (tail) ---\n{}",
            consoles.join("\n"),
            tail(&coordinator.log(), 60)
        );
    };

    // Bounded wait for both nodes Ready, failing early when a VM dies.
    let deadline = Instant::now() + READY_WITHIN;
    let mut last_seen = String::new();
    let status = loop {
        for vm in vms.iter_mut() {
            if let Some(why) = vm.failure() {
                fail(&vms, why, &coordinator);
            }
        }
        let out = coordinator.cli(&["status", "--output", "json"]);
        if out.status.success() {
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let seen: Vec<String> = [SERVER.0, WORKER.0]
                .iter()
                .map(|name| match node(&status, name) {
                    Some(n) => format!(
                        "{name}: {} {} ready={}",
                        n["last_phase"]["step"].as_str().unwrap_or("-"),
                        n["last_phase"]["outcome"].as_str().unwrap_or("-"),
                        n["ready"]
                    ),
                    None => format!("{name}: not enrolled"),
                })
                .collect();
            let seen = seen.join(", ");
            if seen != last_seen {
                eprintln!("vm: +{:>5.1}s {seen}", booted.elapsed().as_secs_f64());
                last_seen = seen;
            }
            let ready = [SERVER.0, WORKER.0]
                .iter()
                .all(|name| node(&status, name).is_some_and(|n| n["ready"] == true));
            if ready {
                break status;
            }
        }
        if Instant::now() >= deadline {
            fail(
                &vms,
                format!("the cluster was not Ready within {READY_WITHIN:?}: {last_seen}"),
                &coordinator,
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!(
        "vm: both nodes Ready {:.1} s after power-on",
        booted.elapsed().as_secs_f64()
    );

    // Both enrolled with certificates from this coordinator's CA and hold a live link.
    let server = node(&status, SERVER.0).unwrap();
    let worker = node(&status, WORKER.0).unwrap();
    for (n, (name, ip, _)) in [(server, SERVER), (worker, WORKER)] {
        assert_eq!(n["connected"], true, "{n:#}");
        assert_eq!(n["state"], "enrolled", "{n:#}");
        assert!(
            !n["certificate_serial"].as_str().unwrap_or("").is_empty(),
            "{n:#}"
        );
        // Facts come from the guest itself: the hostname from the seed, the static address
        // from the rendered network-config, the OS from its /etc/os-release.
        assert_eq!(n["facts"]["hostname"], name, "{n:#}");
        assert!(
            n["facts"]["ip_addresses"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a == ip),
            "{n:#}"
        );
        assert!(
            n["facts"]["os"]
                .as_str()
                .unwrap()
                .starts_with("Debian GNU/Linux 12"),
            "{n:#}"
        );
        // The installer ran and systemd started the unit: the last step is a finished start.
        assert_eq!(n["last_phase"]["step"], "start", "{n:#}");
        assert_eq!(n["last_phase"]["outcome"], "succeeded", "{n:#}");
        assert_eq!(n["last_health"]["healthy"], true, "{n:#}");
    }
    // Every boot got its own machine-id (the image has an empty one).
    assert_ne!(server["facts"]["machine_id"], worker["facts"]["machine_id"]);
    assert_eq!(server["role"], "server", "{server:#}");
    assert_eq!(worker["role"], "agent", "{worker:#}");
    let server_health = server["last_health"]["detail"].as_str().unwrap();
    assert!(
        server_health.starts_with("k3s.service active (k3s server v1.31.4+k3s1"),
        "{server_health}"
    );
    // The worker joined the server with its K10<CA hash> token (the fake refuses a CA that
    // does not match and an agent token that is not the server's), so the server's own view
    // of the cluster has both nodes Ready, and the coordinator counts the worker Ready from it.
    assert!(server_health.contains("2/2 nodes Ready"), "{server_health}");
    let worker_health = worker["last_health"]["detail"].as_str().unwrap();
    assert!(
        worker_health.starts_with("k3s-agent.service active (k3s agent v1.31.4+k3s1"),
        "{worker_health}"
    );

    // cloud-init finished without a warning, and no secret reached a console (the journal is
    // forwarded there) or the coordinator's log.
    let enrollment_tokens: Vec<String> = [SERVER.0, WORKER.0]
        .iter()
        .map(|name| seed_token(&dir.join("seeds").join(name).join("user-data")))
        .collect();
    let mut logs = vec![("coordinator log".to_owned(), coordinator.log())];
    for vm in &vms {
        let console = fs::read_to_string(vm.run.join("console.log")).unwrap();
        assert!(
            console.contains("Cloud-init v. "),
            "{}",
            vm.console_tail(40)
        );
        assert!(console.contains(" finished at "), "{}", vm.console_tail(40));
        for line in console.lines().filter(|l| l.contains("cloud-init")) {
            assert!(
                !line.contains("WARNING") && !line.contains("Traceback"),
                "{}: {line}",
                vm.name
            );
        }
        logs.push((format!("{} console", vm.name), console));
    }
    for (what, text) in &logs {
        for secret in
            enrollment_tokens
                .iter()
                .map(String::as_str)
                .chain(["K10", "::node:", "::server:"])
        {
            assert!(!text.contains(secret), "{what} holds a secret");
        }
    }
    drop(vms);
}

/// The enrollment token that a rendered user-data writes to /etc/homelab-agent/token.
fn seed_token(user_data: &Path) -> String {
    use base64::Engine as _;
    let text = fs::read_to_string(user_data).unwrap();
    let after = text
        .split_once("path: /etc/homelab-agent/token")
        .expect("user-data writes the token")
        .1;
    let content = after
        .lines()
        .find_map(|l| l.trim().strip_prefix("content: "))
        .expect("the token's content");
    let token = base64::engine::general_purpose::STANDARD
        .decode(content.trim().trim_matches('"'))
        .unwrap();
    let token = String::from_utf8(token).unwrap().trim().to_owned();
    assert!(token.len() >= 32, "an implausible token");
    token
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
