//! `homelab`: the coordinator CLI and daemon. Everything happens in [`homelab::cli`].

fn main() -> std::process::ExitCode {
    homelab::cli::main()
}
