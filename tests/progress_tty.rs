//! `migtun migrate` on a real terminal: the CLI runs on a pseudo-terminal 80 columns wide during
//! a real migration, and what it draws is replayed on an emulated terminal of that width. No
//! line may run past the edge: a line that does wraps, and its redraws leave debris.

mod vm;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Stdio;

use vm::*;

const COLUMNS: usize = 80;

/// A pseudo-terminal of `cols` columns: (master, slave).
fn openpty(cols: u16) -> (std::fs::File, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    let ws = libc::winsize { ws_row: 40, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: openpty writes two descriptors into our locals and reads the winsize we pass.
    let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &ws) };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and ours alone.
    unsafe { (std::fs::File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// A terminal `width` columns wide with deferred auto-wrap, fed the bytes the CLI wrote.
/// Records every wrap that continued a line whose last column was not blank: the CLI keeps the
/// last column blank, so such a wrap is a line that ran past the edge.
struct Emulator {
    width: usize,
    rows: Vec<Vec<char>>,
    row: usize,
    col: usize,
    pending_wrap: bool,
    overflows: Vec<String>,
}

impl Emulator {
    fn new(width: usize) -> Emulator {
        Emulator { width, rows: vec![Vec::new()], row: 0, col: 0, pending_wrap: false, overflows: Vec::new() }
    }

    fn line(&self, row: usize) -> String {
        self.rows.get(row).map(|r| r.iter().collect::<String>()).unwrap_or_default()
    }

    fn newline(&mut self) {
        self.row += 1;
        self.col = 0;
        self.pending_wrap = false;
        while self.rows.len() <= self.row {
            self.rows.push(Vec::new());
        }
    }

    fn put(&mut self, ch: char) {
        if self.pending_wrap {
            let left = self.line(self.row);
            if !left.ends_with(' ') {
                self.overflows.push(format!("{left}|{ch}"));
            }
            self.newline();
        }
        let r = &mut self.rows[self.row];
        while r.len() <= self.col {
            r.push(' ');
        }
        r[self.col] = ch;
        if self.col + 1 == self.width {
            self.pending_wrap = true;
        } else {
            self.col += 1;
        }
    }

    fn feed(&mut self, text: &str) {
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\r' => {
                    self.col = 0;
                    self.pending_wrap = false;
                }
                '\n' => self.newline(),
                '\x1b' => {
                    if chars.peek() != Some(&'[') {
                        chars.next();
                        continue;
                    }
                    chars.next();
                    let mut params = String::new();
                    let mut cmd = ' ';
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            cmd = c;
                            break;
                        }
                        params.push(c);
                    }
                    let n = params.trim_start_matches('?').split(';').next().and_then(|p| p.parse::<usize>().ok()).unwrap_or(1);
                    self.pending_wrap = false;
                    match cmd {
                        'A' => self.row = self.row.saturating_sub(n),
                        'B' => {
                            for _ in 0..n {
                                self.newline();
                            }
                        }
                        'C' => self.col = (self.col + n).min(self.width - 1),
                        'D' => self.col = self.col.saturating_sub(n),
                        'G' => self.col = n.saturating_sub(1).min(self.width - 1),
                        'K' => {
                            let r = &mut self.rows[self.row];
                            if params == "2" {
                                r.clear();
                            } else {
                                r.truncate(self.col);
                            }
                        }
                        _ => {}
                    }
                }
                c if c.is_control() => {}
                c => self.put(c),
            }
        }
    }
}

#[test]
fn progress_fits_an_80_column_terminal() {
    let Some(qemu) = qemu() else { return };
    let hosts = Hosts::start();
    let guest = start_guest_with(&hosts, &qemu, &GuestOpts { name: "tty", running: true, ram_mib: 256, raw_mib: 64 });
    let (mut master, slave) = openpty(COLUMNS as u16);
    let out = || Stdio::from(slave.try_clone().unwrap());
    // RAM at 40 MB/s: several seconds of redraws.
    let mut child = migrate_command(&hosts, "host-a", &guest, "host-b")
        .args(["--max-bandwidth", "40000000"])
        .env("TERM", "xterm-256color")
        .env("COLUMNS", COLUMNS.to_string())
        .stdin(Stdio::null())
        .stdout(out())
        .stderr(out())
        .spawn()
        .unwrap();
    drop(slave);
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the CLI (the last holder of the slave side) has exited.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        all
    });
    let status = child.wait().unwrap();
    let bytes = reader.join().unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(status.success(), "{text}\n{}", hosts.logs());
    let id = text.split_whitespace().find(|w| w.starts_with("m-") && w.ends_with(':')).unwrap_or_default().trim_end_matches(':').to_string();
    let _dest = PidFile(hosts.path("run-host-b").join(&id).join("qemu.pid"));

    let mut term = Emulator::new(COLUMNS);
    term.feed(&text);
    let screen: Vec<String> = (0..term.rows.len()).map(|r| term.line(r).trim_end().to_string()).collect();
    let screen = screen.join("\n");
    assert!(term.overflows.is_empty(), "lines ran past column {COLUMNS}: {:#?}\n{screen}", term.overflows);
    assert!(screen.contains("  ram    ="), "a RAM bar was drawn: {screen}");
    assert!(screen.lines().any(|l| l.starts_with("  ram") && l.ends_with("done")), "the RAM bar completed: {screen}");
    assert!(text.contains("MiB/s"), "rates in IEC units: {text:?}");
    assert!(!text.contains("MB/s") && !text.contains("GB/s"), "no SI rates: {text:?}");
    assert!(screen.contains("Succeeded:"), "{screen}");
}
