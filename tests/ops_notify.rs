//! `migtun_proxy::notify`, the functions the agent (and its reload) call, against a datagram
//! socket standing in for systemd's: each sends what sd_notify(3) and systemd expect, and
//! RELOADING=1 carries MONOTONIC_USEC (systemd 253+ fails a reload without it). One test in its
//! own binary, because it sets NOTIFY_SOCKET for the whole process.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use migtun_proxy::notify;

fn read_clock_monotonic_usec() -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a pointer to a live local of that type.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) }, 0);
    ts.tv_sec as i128 * 1_000_000 + ts.tv_nsec as i128 / 1000
}

#[test]
fn each_notification_says_what_systemd_expects() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // SAFETY (of the set_var): this is the binary's only test and no other thread is started yet.
    std::env::set_var("NOTIFY_SOCKET", &path);
    let next = || {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    };

    notify::ready("serving on 127.0.0.1:7443");
    assert_eq!(next(), "READY=1\nSTATUS=serving on 127.0.0.1:7443\n");
    let before = read_clock_monotonic_usec();
    notify::reloading("reloading /etc/migtun/migtun.toml");
    let reload = next();
    let lines: Vec<&str> = reload.lines().collect();
    assert_eq!(lines[0], "RELOADING=1", "{reload:?}");
    let usec: i128 = lines[1].strip_prefix("MONOTONIC_USEC=").expect("MONOTONIC_USEC").parse().unwrap();
    assert!(usec >= before && usec <= read_clock_monotonic_usec(), "CLOCK_MONOTONIC in µs: {usec}");
    assert_eq!(lines[2], "STATUS=reloading /etc/migtun/migtun.toml");
    notify::ready("serving on 127.0.0.1:7443 (reloaded)");
    assert!(next().starts_with("READY=1\n"));
    notify::stopping("draining (up to 30 s)");
    assert_eq!(next(), "STOPPING=1\nSTATUS=draining (up to 30 s)\n");
    notify::status("2 migrations running");
    assert_eq!(next(), "STATUS=2 migrations running\n");

    // Nobody listening (systemd gone): logged, not fatal.
    drop(socket);
    notify::ready("still fine");
    std::env::remove_var("NOTIFY_SOCKET");
    notify::ready("not under systemd: nothing is sent");
}
