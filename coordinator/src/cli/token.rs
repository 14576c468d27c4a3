//! `homelab token create`: one-time enrollment tokens.

use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

use super::{Context, OutputFormat, output::print_json, parse_duration};
use crate::{core::now_unix, pki::NodeName, token::EnrollmentToken};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a single-use token that lets the agent on NODE enroll. The token is printed
    /// once and only its hash is stored. Give it to the node through cloud-init, in a file
    /// readable only by root.
    Create(CreateArgs),
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The node the token is bound to: a DNS label such as k3s-control.
    node: String,
    /// How long the token stays valid (s, m, h or d).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    ttl: Duration,
}

#[derive(Serialize)]
struct Created<'a> {
    node: &'a str,
    token: &'a str,
    expires_at_unix: i64,
}

pub(super) fn run(ctx: &Context, command: Command) -> anyhow::Result<()> {
    let Command::Create(args) = command;
    let node = NodeName::parse(&args.node)?;
    let mut store = ctx.state.open_store()?;
    let token = EnrollmentToken::generate();
    let now = now_unix();
    let expires_at = now + i64::try_from(args.ttl.as_secs()).unwrap_or(i64::MAX / 2);
    store
        .insert_token(&token.hash(), node.as_str(), now, expires_at)
        .context("failed to store the token")?;
    store.append_event(
        node.as_str(),
        "token.created",
        &format!("enrollment token created, valid until {expires_at}"),
        crate::core::now_unix_ms(),
    )?;
    match ctx.output {
        OutputFormat::Json => print_json(&Created {
            node: node.as_str(),
            token: token.expose(),
            expires_at_unix: expires_at,
        })?,
        // The token alone on stdout, so `homelab token create n > token` just works.
        OutputFormat::Table => println!("{}", token.expose()),
    }
    Ok(())
}
