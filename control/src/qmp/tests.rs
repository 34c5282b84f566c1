//! The parser against real and malformed lines, the client against a QMP server on a socket.

use serde_json::{json, Value};
use tokio::io::BufReader;

use super::*;

#[test]
fn parses_qemu_7_2_greeting() {
    let line = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18"}, "capabilities": ["oob"]}}"#;
    let Ok(Message::Greeting(g)) = parse_message(line) else {
        panic!("not a greeting: {:?}", parse_message(line));
    };
    assert_eq!((g.major, g.minor, g.micro), (7, 2, 22));
    assert_eq!(g.package, "Debian 1:7.2+dfsg-7+deb12u18");
    assert_eq!(g.capabilities, vec!["oob".to_string()]);
}

#[test]
fn parses_replies_errors_and_events() {
    assert_eq!(
        parse_message(br#"{"return": {"running": false}, "id": 7}"#),
        Ok(Message::Return {
            id: Some(7),
            value: json!({"running": false})
        })
    );
    assert_eq!(
        parse_message(
            br#"{"id": 3, "error": {"class": "CommandNotFound", "desc": "The command x has not been found"}}"#
        ),
        Ok(Message::Error {
            id: Some(3),
            class: "CommandNotFound".into(),
            desc: "The command x has not been found".into()
        })
    );
    assert_eq!(
        parse_message(
            br#"{"timestamp": {"seconds": 1700000000, "microseconds": 123}, "event": "STOP"}"#
        ),
        Ok(Message::Event(Event {
            name: "STOP".into(),
            data: Value::Null,
            timestamp: Some((1700000000, 123))
        }))
    );
    let Ok(Message::Event(ev)) = parse_message(
        br#"{"event": "BLOCK_JOB_READY", "data": {"device": "m0"}, "timestamp": {"seconds": -1}}"#,
    ) else {
        panic!("event expected")
    };
    assert_eq!(ev.data["device"], "m0");
    assert_eq!(ev.timestamp, None);
    // An error reply to an unparsable request has no id.
    assert!(matches!(
        parse_message(br#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#),
        Ok(Message::Error { id: None, .. })
    ));
    // Surrounding whitespace (QEMU ends lines with \r\n) is fine.
    assert!(matches!(
        parse_message(b"  {\"return\": {}, \"id\": 1}\r\n"),
        Ok(Message::Return { id: Some(1), .. })
    ));
}

#[test]
fn rejects_malformed_lines_without_panicking() {
    let bad: &[&[u8]] = &[
        b"",
        b"garbage",
        b"\xff\xfe\x00",
        b"[1, 2]",
        b"42",
        b"{\"return\": {}, \"id\": 1",
        br#"{"return": {}, "id": "abc"}"#,
        br#"{"return": {}, "id": -1}"#,
        br#"{"error": "nope", "id": 1}"#,
        br#"{"error": {"class": 1, "desc": "x"}, "id": 1}"#,
        br#"{"event": 5}"#,
        br#"{"QMP": {}}"#,
        br#"{"QMP": {"version": {"qemu": {"major": "7"}}}}"#,
        br#"{"something": "else"}"#,
    ];
    for line in bad {
        let r = parse_message(line);
        assert!(
            r.is_err(),
            "{:?} parsed as {r:?}",
            String::from_utf8_lossy(line)
        );
    }
    // Error messages quote the input, but only an excerpt of it.
    let long = format!("{{\"x\": \"{}\"", "a".repeat(10_000));
    let e = parse_message(long.as_bytes()).unwrap_err();
    assert!(e.len() < 500, "{e}");
}

#[tokio::test]
async fn line_reader_bounds_and_truncation() {
    let mut r = BufReader::with_capacity(4, &b"ab\ncdef\r\n\nxyz"[..]);
    let mut buf = Vec::new();
    assert!(read_line(&mut r, &mut buf, 16).await.unwrap());
    assert_eq!(buf, b"ab\n");
    buf.clear();
    assert!(read_line(&mut r, &mut buf, 16).await.unwrap());
    assert_eq!(buf, b"cdef\r\n");
    buf.clear();
    assert!(read_line(&mut r, &mut buf, 16).await.unwrap());
    assert_eq!(buf, b"\n");
    buf.clear();
    assert!(matches!(
        read_line(&mut r, &mut buf, 16).await,
        Err(LineError::Truncated)
    ));
    buf.clear();
    let mut r = BufReader::with_capacity(4, &b""[..]);
    assert!(!read_line(&mut r, &mut buf, 16).await.unwrap());

    // Exactly `max` bytes before the newline is fine, one more is not.
    let mut r = BufReader::with_capacity(3, &b"12345\n123456\n"[..]);
    assert!(read_line(&mut r, &mut buf, 5).await.unwrap());
    buf.clear();
    assert!(matches!(
        read_line(&mut r, &mut buf, 5).await,
        Err(LineError::TooLong)
    ));
}

#[test]
fn typed_replies_tolerate_omissions_and_reject_mismatches() {
    let m: MigrationInfo = decode("query-migrate", &json!({})).unwrap();
    assert_eq!(m.status, "none");
    assert_eq!(m.ram, None);
    let m: MigrationInfo = decode(
        "query-migrate",
        &json!({"status": "active", "expected-downtime": 300, "total-time": 1234,
                "ram": {"transferred": 10, "remaining": 20, "total": 30, "mbps": 941.5,
                        "dirty-pages-rate": 4, "duplicate": 9}}),
    )
    .unwrap();
    assert_eq!(m.ram.as_ref().unwrap().mbps, 941.5);
    assert_eq!(m.expected_downtime, Some(300));
    let e = decode::<Status>("query-status", &json!("nonsense")).unwrap_err();
    assert!(
        matches!(&e, QmpError::Protocol(m) if m.contains("query-status")),
        "{e}"
    );
}

#[test]
fn error_messages_read_well() {
    let e = QmpError::Qemu {
        command: "blockdev-mirror".into(),
        class: "GenericError".into(),
        desc: "Cannot find device='x'".into(),
    };
    assert_eq!(
        e.to_string(),
        "QEMU refused blockdev-mirror: GenericError: Cannot find device='x'"
    );
    let e = QmpError::Timeout {
        command: "query-status".into(),
        secs: 0.5,
    };
    assert!(e
        .to_string()
        .starts_with("query-status: no answer from QEMU within 0.5 s"));
}
