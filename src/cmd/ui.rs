//! What `migtun migrate` shows: a progress bar per stage on a terminal, or the agent's events
//! as JSON lines (`--json`).
//!
//! Every line fits the terminal: the bar takes what the text leaves (`{wide_bar}`), the text
//! drops its least important parts when the terminal is narrow, and notes are wrapped. One unit
//! system: IEC bytes (KiB, MiB, GiB) and bytes per second. A stage's bar is completed only when
//! the migration moved past that stage; a cancel or a failure leaves it where it was
//! (`abandon`), so the screen never claims more than was copied.

use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use migtun_control::messages::{Event, OutcomeKind, Report, Totals};

/// Narrowest bar drawn; below it the bar goes and only the text is shown.
const MIN_BAR: usize = 10;
/// `"  mirror "`, the space before the text and the blank last column: what a progress line
/// has besides bar and text.
const LINE_FIXED: usize = 2 + 6 + 1 + 1 + 1;

/// Where the human output goes.
pub struct Screen {
    /// A draw target for a new bar.
    target: Box<dyn Fn() -> ProgressDrawTarget>,
    /// Writes one line when no bar is drawn.
    write: Box<dyn Fn(&str)>,
    /// The terminal's columns; `None`: not a terminal (no bars, no wrapping).
    width: Box<dyn Fn() -> Option<usize>>,
}

impl Screen {
    /// Standard error: bars only if it is a terminal.
    pub fn stderr() -> Screen {
        Screen {
            target: Box::new(ProgressDrawTarget::stderr),
            write: Box::new(|line| eprintln!("{line}")),
            width: Box::new(stderr_columns),
        }
    }

    /// Any terminal-like thing (tests draw into an in-memory one).
    #[cfg(test)]
    fn term_like<T: indicatif::TermLike + Clone + 'static>(term: T) -> Screen {
        let (t, w) = (term.clone(), term.clone());
        Screen {
            target: Box::new(move || ProgressDrawTarget::term_like(Box::new(t.clone()))),
            write: Box::new(move |line| {
                let _ = w.write_line(line);
            }),
            width: Box::new(move || Some(term.width() as usize)),
        }
    }
}

/// Columns of the terminal on standard error, if it is one.
fn stderr_columns() -> Option<usize> {
    // SAFETY: isatty and TIOCGWINSZ on fd 2, writing into a zeroed winsize on our stack.
    unsafe {
        if libc::isatty(2) != 1 {
            return None;
        }
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(2, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0 {
            Some(ws.ws_col as usize)
        } else {
            // What indicatif (console) assumes then.
            Some(80)
        }
    }
}

struct StageBar {
    stage: String,
    bar: ProgressBar,
}

pub struct Ui {
    json: bool,
    screen: Screen,
    bar: Option<StageBar>,
    /// Stages whose bar has ended: a late progress report does not open it again.
    ended: Vec<String>,
}

impl Ui {
    pub fn new(json: bool, screen: Screen) -> Ui {
        Ui { json, screen, bar: None, ended: Vec::new() }
    }

    /// A line for people (standard error), wrapped short of the terminal's last column.
    pub fn note(&mut self, message: &str) {
        let width = (self.screen.width)().map(|w| w.saturating_sub(1));
        for line in wrap(message, width) {
            match &self.bar {
                Some(b) => b.bar.println(&line),
                None => (self.screen.write)(&line),
            }
        }
    }

    /// One event from the agent; `raw` is its line as the agent sent it.
    pub fn show(&mut self, event: &Event, raw: &serde_json::Value) {
        if self.json {
            println!("{raw}");
            return;
        }
        match &event.report {
            Report::Accepted { vm, to } => self.note(&format!("migration {}: {vm} -> {to}", event.id)),
            Report::Phase { phase, step, message } => {
                let completed = self.bar.as_ref().is_some_and(|b| stage_completed(&b.stage, phase, step.as_deref()));
                self.end_bar(completed);
                if phase == "done" {
                    // The `done` event says how it ended.
                    return;
                }
                let name = match step {
                    Some(s) => format!("{phase}/{s}"),
                    None => phase.clone(),
                };
                self.note(&format!("[{name}] {message}"));
            }
            Report::Log { message } => self.note(&format!("  {message}")),
            Report::Progress { stage, done_bytes, total_bytes, bytes_per_s, eta_s, dirty_bytes_per_s, expected_downtime_ms } => {
                let Some(width) = (self.screen.width)() else { return };
                let Some(bar) = self.bar_for(stage) else { return };
                let total = (*total_bytes).max(*done_bytes);
                let figures = Figures {
                    done: *done_bytes,
                    total,
                    rate: *bytes_per_s,
                    eta: *eta_s,
                    dirty: *dirty_bytes_per_s,
                    downtime_ms: *expected_downtime_ms,
                };
                let (with_bar, text) = progress_text(width, &figures);
                bar.set_style(style(stage, with_bar));
                bar.set_length(total);
                bar.set_position(*done_bytes);
                bar.set_message(text);
            }
            Report::Done { outcome, message, .. } => {
                self.end_bar(*outcome == OutcomeKind::Succeeded);
                self.note(&format!("{outcome:?}: {message}"));
            }
        }
    }

    /// The agent refused the request itself (no migration exists).
    pub fn refused(&mut self, error: &str) {
        if self.json {
            let done = Event::now("", Report::done(OutcomeKind::Refused, error.to_string(), Totals::default()));
            if let Ok(line) = serde_json::to_string(&done) {
                println!("{line}");
            }
        }
    }

    /// Ctrl-C: the bar stays where it is.
    pub fn interrupted(&mut self) {
        self.end_bar(false);
        self.note("Ctrl-C: asking the agent to cancel the migration (rolling back) ...");
    }

    /// The end: a bar still drawn is completed only if the migration succeeded.
    pub fn end(&mut self, outcome: Option<OutcomeKind>) {
        self.end_bar(outcome == Some(OutcomeKind::Succeeded));
    }

    fn bar_for(&mut self, stage: &str) -> Option<ProgressBar> {
        if let Some(b) = &self.bar {
            if b.stage == stage {
                return Some(b.bar.clone());
            }
        }
        if self.ended.iter().any(|s| s == stage) {
            return None;
        }
        // Another stage began: the previous one is behind us.
        self.end_bar(true);
        let bar = ProgressBar::with_draw_target(Some(0), (self.screen.target)());
        bar.set_style(style(stage, true));
        bar.enable_steady_tick(Duration::from_millis(250));
        self.bar = Some(StageBar { stage: stage.to_string(), bar: bar.clone() });
        Some(bar)
    }

    /// Ends the current bar: at 100% if its stage completed, else where it is.
    fn end_bar(&mut self, completed: bool) {
        if let Some(b) = self.bar.take() {
            if completed {
                if let Some(len) = b.bar.length() {
                    b.bar.set_position(len);
                    b.bar.set_message(format!("{}/{} done", HumanBytes(len), HumanBytes(len)));
                }
                b.bar.finish();
            } else {
                b.bar.abandon();
            }
            self.ended.push(b.stage);
        }
    }
}

/// Whether a migration that reached `phase`/`step` has completed `stage`: the mirrors once the
/// RAM migration starts or the mirrors complete, RAM at switchover, both at finish. A rollback
/// (`confirm` straight from `perform`) completes nothing.
fn stage_completed(stage: &str, phase: &str, step: Option<&str>) -> bool {
    matches!(
        (stage, phase, step),
        (_, "finish", _)
            | ("mirror", "perform", Some("starting-migration" | "migrating" | "completing-mirrors" | "switchover"))
            | ("ram", "perform", Some("completing-mirrors" | "switchover"))
    )
}

fn style(stage: &str, with_bar: bool) -> ProgressStyle {
    // The last column stays blank: a line that fills it leaves the cursor waiting to wrap, and
    // whatever comes next would continue it.
    let template = if with_bar { "  {prefix:6} {wide_bar:.cyan/blue} {msg} " } else { "  {prefix:6} {wide_msg} " };
    let style = ProgressStyle::with_template(&template.replace("{prefix:6}", &format!("{stage:6}")))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    style.progress_chars("=> ")
}

/// The numbers of one progress line.
struct Figures {
    done: u64,
    total: u64,
    rate: Option<f64>,
    eta: Option<f64>,
    dirty: Option<f64>,
    downtime_ms: Option<i64>,
}

/// The text of a progress line for a terminal `width` wide, and whether a bar fits beside it:
/// bytes and rate always, then as room allows the ETA, the expected downtime, the dirty rate.
fn progress_text(width: usize, f: &Figures) -> (bool, String) {
    let mut parts = vec![format!("{}/{}", HumanBytes(f.done), HumanBytes(f.total))];
    // Not measured yet (the first poll): no figure rather than a false 0.
    parts.extend(f.rate.map(rate));
    let optional = [
        f.eta.map(|e| format!("eta {}", duration(e))),
        f.downtime_ms.map(|d| format!("downtime ~{d} ms")),
        f.dirty.filter(|d| *d > 0.0).map(|d| format!("dirty {}", rate(d))),
    ];
    let room = width.saturating_sub(LINE_FIXED + MIN_BAR);
    let fits = |parts: &[String]| parts.join(" ").chars().count() <= room;
    if !fits(&parts) {
        // Too narrow for a bar: the text alone, truncated by `{wide_msg}` if need be.
        return (false, parts.join(" "));
    }
    for part in optional.into_iter().flatten() {
        parts.push(part);
        if !fits(&parts) {
            parts.pop();
            break;
        }
    }
    (true, parts.join(" "))
}

/// Bytes per second in IEC units: `312.5 MiB/s`.
pub fn rate(bytes_per_s: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes_per_s.max(0.0);
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}/s", units[i])
}

/// `45s`, `3m05s`, `2h07m`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// `text` in lines of at most `width` columns (words are kept whole unless one is longer than a
/// line); continuation lines are indented two more than the first. Not a terminal: one line.
pub fn wrap(text: &str, width: Option<usize>) -> Vec<String> {
    let Some(width) = width.filter(|w| *w > 8) else { return vec![text.to_string()] };
    let first: String = text.chars().take_while(|c| *c == ' ').collect();
    let hanging = format!("{first}  ");
    let mut lines = Vec::new();
    let mut line = first;
    // The current line holds no word yet.
    let mut empty = true;
    for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        while !word.is_empty() {
            let used = line.chars().count();
            if used + word.len() + usize::from(!empty) <= width {
                if !empty {
                    line.push(' ');
                }
                line.extend(word.drain(..));
                empty = false;
            } else if !empty {
                lines.push(std::mem::replace(&mut line, hanging.clone()));
                empty = true;
            } else {
                // A word longer than a line: split it.
                let take = width.saturating_sub(used).max(1).min(word.len());
                line.extend(word.drain(..take));
                lines.push(std::mem::replace(&mut line, hanging.clone()));
            }
        }
    }
    if !empty || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// `bytes` moved in `secs`, as a rate in IEC units (the demo's summary).
pub fn rate_of(bytes: u64, secs: f64) -> String {
    rate(if secs > 0.0 { bytes as f64 / secs } else { 0.0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};

    /// A terminal of fixed width in memory, with deferred auto-wrap like a real one (indicatif
    /// pads each line to the width and relies on it). Records every text it is given, so that
    /// a test can see whether any line was wider than the terminal.
    #[derive(Clone, Debug)]
    struct VirtualTerm {
        width: u16,
        state: Arc<Mutex<Vt>>,
    }

    #[derive(Debug, Default)]
    struct Vt {
        rows: Vec<Vec<char>>,
        row: usize,
        col: usize,
        pending_wrap: bool,
        /// Every text written, as it would show (escape sequences removed).
        texts: Vec<String>,
    }

    impl VirtualTerm {
        fn new(width: u16) -> VirtualTerm {
            VirtualTerm { width, state: Arc::new(Mutex::new(Vt::default())) }
        }

        fn with<R>(&self, f: impl FnOnce(&mut Vt) -> R) -> R {
            f(&mut self.state.lock().unwrap())
        }

        fn put(&self, s: &str) {
            let width = self.width as usize;
            self.with(|vt| {
                let text = strip_ansi(s);
                if !text.trim().is_empty() {
                    vt.texts.push(text.clone());
                }
                for ch in text.chars() {
                    match ch {
                        '\r' => {
                            vt.col = 0;
                            vt.pending_wrap = false;
                        }
                        '\n' => vt.newline(),
                        ch => {
                            if vt.pending_wrap {
                                vt.newline();
                            }
                            let (row, col) = (vt.row, vt.col);
                            vt.cell(row, col, ch);
                            if vt.col + 1 == width {
                                vt.pending_wrap = true;
                            } else {
                                vt.col += 1;
                            }
                        }
                    }
                }
            });
        }

        /// The widest text ever written, and which.
        fn widest(&self) -> (usize, String) {
            self.with(|vt| vt.texts.iter().map(|t| (t.chars().count(), t.clone())).max().unwrap_or_default())
        }

        fn screen(&self) -> Vec<String> {
            self.with(|vt| vt.rows.iter().map(|r| r.iter().collect::<String>().trim_end().to_string()).collect())
        }
    }

    impl Vt {
        fn newline(&mut self) {
            self.row += 1;
            self.col = 0;
            self.pending_wrap = false;
        }

        fn cell(&mut self, row: usize, col: usize, ch: char) {
            while self.rows.len() <= row {
                self.rows.push(Vec::new());
            }
            let r = &mut self.rows[row];
            while r.len() <= col {
                r.push(' ');
            }
            r[col] = ch;
        }
    }

    fn strip_ansi(s: &str) -> String {
        let mut out = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
                continue;
            }
            out.push(c);
        }
        out
    }

    impl indicatif::TermLike for VirtualTerm {
        fn width(&self) -> u16 {
            self.width
        }
        fn move_cursor_up(&self, n: usize) -> io::Result<()> {
            self.with(|vt| {
                vt.row = vt.row.saturating_sub(n);
                vt.pending_wrap = false;
            });
            Ok(())
        }
        fn move_cursor_down(&self, n: usize) -> io::Result<()> {
            self.with(|vt| {
                vt.row += n;
                vt.pending_wrap = false;
            });
            Ok(())
        }
        fn move_cursor_right(&self, n: usize) -> io::Result<()> {
            let w = self.width as usize;
            self.with(|vt| vt.col = (vt.col + n).min(w - 1));
            Ok(())
        }
        fn move_cursor_left(&self, n: usize) -> io::Result<()> {
            self.with(|vt| vt.col = vt.col.saturating_sub(n));
            Ok(())
        }
        fn write_line(&self, s: &str) -> io::Result<()> {
            self.put(s);
            self.with(|vt| vt.newline());
            Ok(())
        }
        fn write_str(&self, s: &str) -> io::Result<()> {
            self.put(s);
            Ok(())
        }
        fn clear_line(&self) -> io::Result<()> {
            self.with(|vt| {
                let row = vt.row;
                if let Some(r) = vt.rows.get_mut(row) {
                    r.clear();
                }
                vt.col = 0;
                vt.pending_wrap = false;
            });
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
    }

    fn event(report: Report) -> Event {
        Event::now("m-0123456789abcdef", report)
    }

    fn phase(phase: &str, step: Option<&str>, message: &str) -> Report {
        Report::Phase { phase: phase.into(), step: step.map(Into::into), message: message.into() }
    }

    fn progress(stage: &str, done: u64, total: u64, rate: f64) -> Report {
        Report::Progress {
            stage: stage.into(),
            done_bytes: done,
            total_bytes: total,
            bytes_per_s: Some(rate),
            eta_s: Some((total - done) as f64 / rate.max(1.0)),
            dirty_bytes_per_s: (stage == "ram").then_some(987_654_321.0),
            expected_downtime_ms: (stage == "ram").then_some(12_345),
        }
    }

    const GIB: u64 = 1 << 30;

    /// A migration as the agent reports it, with the largest figures a line can hold (TiB of
    /// disks, hours of ETA, long messages), through `ui`; `cancel_at_ram` stops it in the RAM
    /// stage as Ctrl-C would.
    fn play(ui: &mut Ui, cancel_at_ram: bool) {
        let show = |ui: &mut Ui, r: Report| {
            let e = event(r);
            let raw = serde_json::to_value(&e).unwrap();
            ui.show(&e, &raw);
            // Let the bar draw each state (indicatif limits its redraw rate).
            std::thread::sleep(Duration::from_millis(60));
        };
        show(ui, Report::Accepted { vm: "a-guest-with-a-rather-long-name".into(), to: "host-b.example.org".into() });
        show(ui, phase("begin", None, "inspecting the VM"));
        show(ui, Report::Log { message: "host-b.example.org runs migtun 0.1.0 (control protocol 1); this log line is long enough to need wrapping on any terminal narrower than one hundred and twenty columns".into() });
        show(ui, phase("perform", Some("syncing-disks"), "copying the disks while the guest runs on"));
        for i in 1..=5u64 {
            show(ui, progress("mirror", i * 300 * GIB, 1536 * GIB, 987.6 * 1024.0 * 1024.0 / i as f64));
        }
        show(ui, phase("perform", Some("migrating"), "copying RAM"));
        for i in 1..=4u64 {
            show(ui, progress("ram", i * 100 * GIB, 1000 * GIB, 1023.9 * 1024.0 * 1024.0 / i as f64));
        }
        if cancel_at_ram {
            ui.interrupted();
            show(ui, phase("confirm", None, "finishing on the source"));
            show(ui, Report::done(OutcomeKind::Cancelled, "cancelled; the guest runs on the source as before".into(), Totals::default()));
            ui.end(Some(OutcomeKind::Cancelled));
        } else {
            show(ui, phase("perform", Some("switchover"), "switchover: the last RAM pages and device state"));
            show(ui, phase("finish", None, "handing the guest over"));
            show(ui, Report::done(OutcomeKind::Succeeded, "the guest now lives on the destination; the source QEMU has quit (in 5.7 s, disks 384 MiB, RAM 512 MiB in 2.1 s, downtime 35 ms)".into(), Totals::default()));
            ui.end(Some(OutcomeKind::Succeeded));
        }
    }

    #[test]
    fn no_line_is_wider_than_the_terminal() {
        for width in [40u16, 80, 120] {
            for cancel in [false, true] {
                let term = VirtualTerm::new(width);
                let mut ui = Ui::new(false, Screen::term_like(term.clone()));
                play(&mut ui, cancel);
                if std::env::var_os("MIGTUN_SHOW_SCREENS").is_some() {
                    eprintln!("--- {width} columns, cancel {cancel}\n{}", term.screen().join("\n"));
                }
                let (widest, text) = term.widest();
                assert!(widest <= width as usize, "{width} columns: a line of {widest}: {text:?}\n{:#?}", term.screen());
                let screen = term.screen();
                assert!(screen.iter().any(|l| l.contains("ram")), "{width} columns: the RAM bar was drawn: {screen:#?}");
                if width >= 80 {
                    if cancel {
                        assert!(screen.iter().any(|l| l.contains("MiB/s")), "{width} columns: a rate in MiB/s: {screen:#?}");
                    }
                    assert!(screen.iter().any(|l| l.contains("=")), "{width} columns: a bar: {screen:#?}");
                }
            }
        }
    }

    #[test]
    fn a_cancelled_stage_stays_where_it_was_and_a_completed_one_is_full() {
        let term = VirtualTerm::new(120);
        let mut ui = Ui::new(false, Screen::term_like(term.clone()));
        play(&mut ui, true);
        let screen = term.screen();
        let ram: Vec<_> = screen.iter().filter(|l| l.trim_start().starts_with("ram")).collect();
        assert_eq!(ram.len(), 1, "one RAM bar: {screen:#?}");
        assert!(ram[0].contains("400.00 GiB/1000.00 GiB"), "the cancelled RAM bar stays at its last figures: {screen:#?}");
        let mirror: Vec<_> = screen.iter().filter(|l| l.trim_start().starts_with("mirror")).collect();
        assert_eq!(mirror.len(), 1, "{screen:#?}");
        // The mirror completed (the RAM migration started): a full bar, the total reached.
        assert!(mirror[0].contains("1.50 TiB/1.50 TiB done"), "{screen:#?}");
        // The bar: after the stage's name, up to the figures.
        let bar = |line: &str| -> String {
            let rest = line.trim_start().split_once(' ').map(|(_, r)| r).unwrap_or_default().trim_start();
            rest.chars().take_while(|c| !c.is_ascii_digit()).collect::<String>().trim_end_matches(' ').to_string() + " "
        };
        assert!(bar(mirror[0]).trim_end().chars().all(|c| c == '='), "a full bar: {screen:#?}");
        let ram_line = ram[0].trim_start().trim_start_matches("ram").trim_start();
        let ram_bar: String = ram_line.chars().take_while(|c| !c.is_ascii_digit()).collect();
        let filled = ram_bar.matches('=').count();
        assert!(ram_bar.contains('>') && filled * 2 < ram_bar.len(), "RAM stays at 40%, not 100%: {ram_bar:?} {screen:#?}");
        assert!(screen.iter().any(|l| l.contains("Cancelled")), "{screen:#?}");
    }

    #[test]
    fn texts_fit_and_use_iec_units() {
        let f = Figures { done: 3 * GIB / 2, total: 4 * GIB, rate: Some(312.5 * 1048576.0), eta: Some(3725.0), dirty: Some(1048576.0), downtime_ms: Some(300) };
        let (bar, text) = progress_text(120, &f);
        assert!(bar);
        assert_eq!(text, "1.50 GiB/4.00 GiB 312.5 MiB/s eta 1h02m downtime ~300 ms dirty 1.0 MiB/s");
        let (bar, text) = progress_text(60, &f);
        assert!(bar && text.chars().count() <= 60 - LINE_FIXED - MIN_BAR, "{text}");
        assert_eq!(text, "1.50 GiB/4.00 GiB 312.5 MiB/s eta 1h02m");
        let (bar, _) = progress_text(30, &f);
        assert!(!bar, "no room for a bar");
        assert_eq!(duration(45.4), "45s");
        assert_eq!(duration(185.0), "3m05s");
        assert_eq!(rate(0.0), "0.0 B/s");
        assert_eq!(rate(1536.0), "1.5 KiB/s");
    }

    #[test]
    fn notes_wrap_at_words_with_a_hanging_indent() {
        assert_eq!(wrap("  a bb ccc dddd", Some(9)), vec!["  a bb", "    ccc", "    dddd"]);
        assert_eq!(wrap("xxxxxxxxxxxxxxxxxxxx", Some(10)), vec!["xxxxxxxxxx", "  xxxxxxxx", "  xx"]);
        assert_eq!(wrap("short", Some(80)), vec!["short"]);
        assert_eq!(wrap("no terminal: one line however long it is", None).len(), 1);
        for line in wrap("  attempt 3: no answer from host-b (connection refused); asking again in 4 s", Some(40)) {
            assert!(line.chars().count() <= 40, "{line}");
        }
    }
}
