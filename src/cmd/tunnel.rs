//! `migtun tunnel open|close|list`: per-migration routes for tooling that drives QEMU itself
//! (see `control/src/tunnels.rs`). Prints the paths to hand to libvirt's `--migrateuri` and
//! `--disks-uri`.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use migtun_control::admin::Request;
use migtun_control::tunnels::TunnelInfo;

/// One request, one answer; an `error` answer becomes the command's error.
fn ask(admin_socket: &Path, request: Request) -> anyhow::Result<serde_json::Value> {
    super::ask_agent(admin_socket, &request)?.map_err(|e| anyhow::anyhow!("{e}"))
}

pub fn open(admin_socket: &Path, to: &str, name: &str, sockets: Vec<String>, ttl: Duration, json: bool) -> anyhow::Result<()> {
    let answer = ask(admin_socket, Request::TunnelOpen { to: to.into(), name: name.into(), sockets, ttl_secs: ttl.as_secs() })?;
    if json {
        println!("{answer}");
        return Ok(());
    }
    let info: TunnelInfo = serde_json::from_value(answer).context("unexpected answer")?;
    print!("{}", render(&info));
    Ok(())
}

pub fn close(admin_socket: &Path, name: &str) -> anyhow::Result<()> {
    ask(admin_socket, Request::TunnelClose { name: name.into() })?;
    println!("tunnel {name}: closed on both hosts");
    Ok(())
}

pub fn list(admin_socket: &Path, json: bool) -> anyhow::Result<()> {
    let answer = ask(admin_socket, Request::TunnelList)?;
    if json {
        println!("{answer}");
        return Ok(());
    }
    let list: Vec<TunnelInfo> = serde_json::from_value(answer["tunnels"].clone()).context("unexpected answer")?;
    if list.is_empty() {
        println!("tunnels: none");
    }
    for t in &list {
        print!("{}", render(t));
    }
    Ok(())
}

/// A tunnel for people: one line per socket with its `unix://` URI, as libvirt takes it.
fn render(t: &TunnelInfo) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let arrow = if t.direction == "outgoing" { "to" } else { "from" };
    let _ = writeln!(out, "tunnel {} {arrow} {} (closes in {} s)", t.name, t.peer, t.expires_in_secs);
    for s in &t.sockets {
        let flag = match s.socket.as_str() {
            "migration" => "  --migrateuri",
            "nbd" => "  --disks-uri",
            _ => "",
        };
        let _ = writeln!(out, "  {:<10} unix://{}{flag}", s.socket, s.path.display());
    }
    for s in &t.peer_sockets {
        if t.sockets.iter().any(|l| l.socket == s.socket && l.path != s.path) {
            let _ = writeln!(out, "  {:<10} on {}: {} (the paths differ: tunnels.dir is not the same on both hosts)", s.socket, t.peer, s.path.display());
        }
    }
    out
}
