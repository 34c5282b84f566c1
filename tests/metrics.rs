//! Migration metrics and bounded series (issue 11): twenty migrations between two agents leave
//! the number of series on both agents what it was after the first few (the routes each
//! migration opens for itself are counted as `migration.ram`/`migration.nbd`, not by id), and
//! the migration families count what happened.

mod vm;

use std::io::{Read, Write};

use vm::*;

/// The series of an agent's `/metrics` (sample lines), by name and labels.
fn series(addr: std::net::SocketAddr) -> Vec<String> {
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series.to_string()))
        .collect()
}

#[test]
fn twenty_migrations_leave_the_number_of_series_constant_and_are_counted() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    const MIGRATIONS: usize = 20;
    const SETTLED: usize = 3;
    let mut after_settled = None;
    for i in 0..MIGRATIONS {
        let name: &'static str = Box::leak(format!("met{i}").into_boxed_str());
        let guest = start_guest_with(&hosts, &qemu, &GuestOpts { name, running: false, ram_mib: 16, raw_mib: 1 });
        let (ok, events) = migrate(&hosts, &guest, &[]);
        assert!(ok, "migration {i}: {events:?}");
        let dir = dest_dir(&hosts, &events);
        kill_qemu_of_pidfile(&dir.join("qemu.pid"));
        drop(guest);
        if i + 1 == SETTLED {
            after_settled = Some([series(hosts.metrics[0]), series(hosts.metrics[1])]);
        }
    }
    let [a, b] = after_settled.unwrap();
    let (a_now, b_now) = (series(hosts.metrics[0]), series(hosts.metrics[1]));
    // Series that appeared after the first migrations: none, except (rarely) a stream-failure
    // series of a fixed reason on a migration route, `<unknown>` on the destination (a late NBD
    // connect after the destination removed its routes, seen about once in five runs): bounded by routes x reasons, not by
    // the number of migrations.
    let grown = |before: &[String], now: &[String]| -> Vec<String> {
        now.iter()
            .filter(|s| !before.contains(s))
            .filter(|s| !(s.starts_with("migtun_stream_failures_total{") && (s.contains("route=\"migration.") || s.contains("route=\"<unknown>\""))))
            .cloned()
            .collect()
    };
    assert_eq!(grown(&a, &a_now), Vec::<String>::new(), "host-a's series grew");
    assert_eq!(grown(&b, &b_now), Vec::<String>::new(), "host-b's series grew");
    assert!(a_now.len() <= a.len() + 16 && b_now.len() <= b.len() + 16, "{} -> {}, {} -> {}", a.len(), a_now.len(), b.len(), b_now.len());
    assert!(!a_now.iter().any(|s| s.contains("route=\"m-")), "no series names a migration id");
    let n = MIGRATIONS as f64;
    assert_eq!(hosts.metric(0, "migtun_migrations_started_total", &[("peer", "host-b"), ("direction", "outgoing")]), n);
    assert_eq!(hosts.metric(0, "migtun_migrations_finished_total", &[("direction", "outgoing"), ("outcome", "succeeded")]), n);
    assert_eq!(hosts.metric(1, "migtun_migrations_started_total", &[("peer", "host-a"), ("direction", "incoming")]), n);
    assert_eq!(hosts.metric(1, "migtun_migrations_finished_total", &[("direction", "incoming"), ("outcome", "succeeded")]), n);
    assert_eq!(hosts.metric(0, "migtun_migrations_current", &[]), 0.0);
    assert_eq!(hosts.metric(1, "migtun_migrations_current", &[]), 0.0);
    assert_eq!(hosts.metric(0, "migtun_migration_duration_seconds_count", &[("direction", "outgoing")]), n);
    assert_eq!(hosts.metric(0, "migtun_migration_downtime_seconds_count", &[]), n);
    assert!(hosts.metric(0, "migtun_migration_bytes_total", &[("phase", "ram")]) >= n * (16 << 20) as f64 * 0.5);
    assert!(hosts.metric(0, "migtun_migration_bytes_total", &[("phase", "disk")]) >= n * (33 << 20) as f64);
    assert!(hosts.metric(0, "migtun_bytes_total", &[("route", "migration.ram")]) > 0.0);
}
