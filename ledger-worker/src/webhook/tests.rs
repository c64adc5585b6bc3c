//! The webhook gateway against local servers: the contract, signing, credentials.

use std::collections::HashMap;

use super::*;

use LookupOutcome as L;
use SendOutcome as S;

fn accepted(reference: Option<&str>) -> SendOutcome {
    S::Accepted { reference: reference.map(str::to_string) }
}

/// The whole POST contract, one row per case.
#[test]
fn send_answers_are_read_under_the_contract() {
    #[derive(Debug)]
    enum K {
        Accepted(Option<&'static str>),
        Rejected,
        Unknown,
        Unauthorized,
    }
    let rows: &[(u16, &str, K)] = &[
        (200, r#"{"status":"accepted"}"#, K::Accepted(None)),
        (201, r#"{"status":"accepted"}"#, K::Accepted(None)),
        (202, r#"{"status":"accepted","reference":"r1"}"#, K::Accepted(Some("r1"))),
        (200, r#" {"reference":"r2","status":"accepted","extra":[1,2]} "#, K::Accepted(Some("r2"))),
        (200, r#"{"status":"accepted","reference":42}"#, K::Accepted(None)),
        (204, "", K::Unknown),
        (200, "", K::Unknown),
        (200, "{}", K::Unknown),
        (200, r#""accepted""#, K::Unknown),
        (200, "accepted", K::Unknown),
        (200, "OK", K::Unknown),
        (200, r#"{"status":"Accepted"}"#, K::Unknown),
        (200, r#"{"status":"ok"}"#, K::Unknown),
        (200, r#"{"status":"rejected","reason":"no"}"#, K::Unknown),
        (200, r#"{"status":["accepted"]}"#, K::Unknown),
        (200, r#"[{"status":"accepted"}]"#, K::Unknown),
        (200, r#"{"status":"accepted""#, K::Unknown),
        (100, "", K::Unknown),
        (101, "", K::Unknown),
        (301, r#"{"status":"accepted"}"#, K::Unknown),
        (302, "", K::Unknown),
        (303, "", K::Unknown),
        (304, "", K::Unknown),
        (307, "", K::Unknown),
        (308, "", K::Unknown),
        (400, "bad request", K::Rejected),
        (402, "", K::Rejected),
        (404, "not here", K::Rejected),
        (405, "", K::Rejected),
        (410, "", K::Rejected),
        (422, r#"{"error":"account closed"}"#, K::Rejected),
        (451, "", K::Rejected),
        (499, "", K::Rejected),
        (401, "", K::Unauthorized),
        (403, "forbidden", K::Unauthorized),
        (408, "", K::Unknown),
        (409, r#"{"status":"accepted"}"#, K::Unknown),
        (425, "", K::Unknown),
        (429, "slow down", K::Unknown),
        (500, r#"{"status":"accepted"}"#, K::Unknown),
        (502, "", K::Unknown),
        (503, "", K::Unknown),
        (504, "", K::Unknown),
        (599, "", K::Unknown),
        (600, "", K::Unknown),
        (0, "", K::Unknown),
        (999, r#"{"status":"accepted"}"#, K::Unknown),
    ];
    for (status, body, expected) in rows {
        let got = read_send_answer(*status, body);
        let ok = match (&got, expected) {
            (S::Accepted { reference }, K::Accepted(r)) => reference.as_deref() == *r,
            (S::Rejected { reason }, K::Rejected) => reason.starts_with(&format!("HTTP {status}: ")),
            (S::Unknown { error }, K::Unknown) => error.starts_with(&format!("HTTP {status}")),
            (S::Unauthorized { error }, K::Unauthorized) => error.starts_with(&format!("HTTP {status}")),
            _ => false,
        };
        assert!(ok, "POST answered {status} {body:?}: read as {got:?}, expected {expected:?}");
    }
}

/// The whole lookup contract, one row per case.
#[test]
fn lookup_answers_are_read_under_the_contract() {
    let unknown = |e: &LookupOutcome| matches!(e, L::Unknown { .. });
    type Check = dyn Fn(&LookupOutcome) -> bool;
    let rows: &[(u16, &str, &Check)] = &[
        (200, r#"{"status":"accepted"}"#, &|o| *o == L::Accepted { reference: None }),
        (200, r#"{"status":"accepted","reference":"r9"}"#, &|o| *o == L::Accepted { reference: Some("r9".into()) }),
        (200, r#"{"status":"rejected","reason":"account closed"}"#, &|o| {
            *o == L::Rejected { reason: "account closed".into() }
        }),
        (200, r#"{"status":"rejected"}"#, &unknown),
        (200, r#"{"status":"rejected","reason":7}"#, &unknown),
        (200, r#"{"status":"pending"}"#, &unknown),
        (200, "{}", &unknown),
        (200, "", &unknown),
        (200, r#""accepted""#, &unknown),
        (200, "not json", &unknown),
        (201, r#"{"status":"accepted"}"#, &unknown),
        (202, r#"{"status":"accepted"}"#, &unknown),
        (204, "", &unknown),
        (404, r#"{"status":"not_found","idempotency_key":"k-1"}"#, &|o| *o == L::NotFound),
        (404, r#"{"status":"not_found","idempotency_key":"k-1","detail":"never received"}"#, &|o| *o == L::NotFound),
        (404, r#"{"status":"not_found"}"#, &|o| matches!(o, L::Unknown { .. })),
        (404, r#"{"status":"not_found","idempotency_key":"k-2"}"#, &|o| matches!(o, L::Unknown { .. })),
        (404, "", &|o| matches!(o, L::Unknown { .. })),
        (404, "<html>Not Found</html>", &|o| matches!(o, L::Unknown { .. })),
        (404, r#"{"error":"no such route"}"#, &|o| matches!(o, L::Unknown { .. })),
        (404, r#"{"status":"accepted"}"#, &|o| matches!(o, L::Unknown { .. })),
        (401, "", &|o| matches!(o, L::Unauthorized { .. })),
        (403, "", &|o| matches!(o, L::Unauthorized { .. })),
        (301, "", &unknown),
        (302, r#"{"status":"accepted"}"#, &unknown),
        (307, "", &unknown),
        (400, "", &unknown),
        (408, "", &unknown),
        (409, "", &unknown),
        (410, "", &unknown),
        (422, r#"{"status":"rejected","reason":"x"}"#, &unknown),
        (429, "", &unknown),
        (500, "", &unknown),
        (503, r#"{"status":"accepted"}"#, &unknown),
        (100, "", &unknown),
        (0, "", &unknown),
    ];
    for (status, body, check) in rows {
        let got = read_lookup_answer(*status, body, "k-1");
        assert!(check(&got), "GET answered {status} {body:?}: read as {got:?}");
    }
}

#[test]
fn reasons_quote_a_short_single_line_of_the_body() {
    let long = "x".repeat(5_000);
    match read_send_answer(422, &long) {
        S::Rejected { reason } => assert!(reason.chars().count() < 260, "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(read_send_answer(422, "a\nb\r\n"), S::Rejected { reason: "HTTP 422: a b".into() });
    assert_eq!(read_send_answer(410, "  "), S::Rejected { reason: "HTTP 410: (empty body)".into() });
    assert_eq!(read_send_answer(202, r#"{"status":"accepted","reference":"r1"}"#), accepted(Some("r1")));
}

/// RFC 4231, test case 2.
#[test]
fn hmac_sha256_matches_rfc_4231() {
    assert_eq!(
        hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

/// Vectors computed independently (Python's `hmac` module).
#[test]
fn signatures_cover_the_timestamp_a_dot_and_the_body() {
    let secret = Secret::new("whsec_test");
    assert_eq!(
        sign(&secret, 1_700_000_000, r#"{"a":1}"#),
        "38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"
    );
    // A GET signs "<t>." (an empty body).
    assert_eq!(sign(&secret, 1_700_000_000, ""), "5967f3c560522fa40cf2876ebc3c3a08551dd6959aaade3b413460591895bdcc");
    assert_eq!(
        signature_header(&secret, 1_700_000_000, ""),
        "t=1700000000,v1=5967f3c560522fa40cf2876ebc3c3a08551dd6959aaade3b413460591895bdcc"
    );
    assert_eq!(sign(&secret, 1_700_000_000, ""), hmac_sha256_hex(b"whsec_test", b"1700000000."));
}

#[test]
fn keys_are_encoded_as_one_path_segment() {
    assert_eq!(encode_path_segment("payout-w17"), "payout-w17");
    assert_eq!(encode_path_segment("a b/c?d#e%f"), "a%20b%2Fc%3Fd%23e%25f");
    assert_eq!(encode_path_segment("é"), "%C3%A9");
    assert!(check_key(".").is_err() && check_key("..").is_err() && check_key("").is_err());
    assert!(check_key("a\nb").is_err());
    assert!(check_key("payout-w17").is_ok());
}

#[test]
fn urls_must_be_https_unless_loopback() {
    let ok = [
        ("https://bank.example/payouts", "https://bank.example/payouts"),
        ("https://bank.example/payouts/", "https://bank.example/payouts"),
        ("https://bank.example", "https://bank.example"),
        ("http://127.0.0.1:8080/p", "http://127.0.0.1:8080/p"),
        ("http://127.9.8.7/p", "http://127.9.8.7/p"),
        ("http://localhost:1/p", "http://localhost:1/p"),
        ("http://LOCALHOST/p", "http://localhost/p"),
        ("http://[::1]:9/p", "http://[::1]:9/p"),
    ];
    for (raw, checked) in ok {
        assert_eq!(check_url(raw).unwrap_or_else(|e| panic!("{raw}: {e}")), checked);
    }
    let insecure = ["http://bank.example/p", "http://10.0.0.1/p", "http://[::2]/p", "http://localhost.bank.example/p"];
    for raw in insecure {
        assert!(matches!(check_url(raw), Err(WebhookError::InsecureUrl { .. })), "{raw}");
    }
    for raw in ["ftp://bank.example/p", "file:///etc/passwd", "ws://127.0.0.1/p"] {
        assert!(check_url(raw).is_err(), "{raw}");
    }
    for raw in ["", "bank.example/p", "https://", "https://bank.example/p?x=1", "https://bank.example/p#f"] {
        assert!(matches!(check_url(raw), Err(WebhookError::BadUrl { .. })), "{raw}: {:?}", check_url(raw));
    }
    let err = check_url("https://user:hunter2@bank.example/p").unwrap_err();
    assert!(matches!(err, WebhookError::CredentialsInUrl));
    assert!(!err.to_string().contains("hunter2") && !format!("{err:?}").contains("hunter2"));
}

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
    let map: HashMap<String, OsString> = pairs.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
    move |name| map.get(name).cloned()
}

#[test]
fn credentials_come_from_variables_or_files() {
    let c = Credentials::from_lookup(env(&[(TOKEN_VAR, "tok-1"), (SECRET_VAR, "sec-1")])).unwrap();
    assert_eq!((c.token.expose(), c.secret.expose()), ("tok-1", "sec-1"));

    let dir = std::env::temp_dir().join(format!("ledger-webhook-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    let secret_file = dir.join("secret");
    std::fs::write(&token_file, "tok-2\n").unwrap();
    std::fs::write(&secret_file, "sec-2\n\n").unwrap();
    let c = Credentials::from_lookup(env(&[
        (TOKEN_FILE_VAR, token_file.to_str().unwrap()),
        (SECRET_FILE_VAR, secret_file.to_str().unwrap()),
    ]))
    .unwrap();
    // One trailing newline is trimmed, not more.
    assert_eq!((c.token.expose(), c.secret.expose()), ("tok-2", "sec-2\n"));
    std::fs::write(&secret_file, "sec-3\r\n").unwrap();
    let c =
        Credentials::from_lookup(env(&[(TOKEN_VAR, "t"), (SECRET_FILE_VAR, secret_file.to_str().unwrap())])).unwrap();
    assert_eq!(c.secret.expose(), "sec-3");
    std::fs::write(&secret_file, "\n").unwrap();
    let err = Credentials::from_lookup(env(&[(TOKEN_VAR, "t"), (SECRET_FILE_VAR, secret_file.to_str().unwrap())]))
        .unwrap_err();
    assert!(matches!(err, WebhookError::EmptySecret { var: SECRET_FILE_VAR }), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn credential_errors_name_the_variable_and_never_the_value() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[(SECRET_VAR, "sec-x")], TOKEN_VAR),
        (&[(TOKEN_VAR, "tok-x")], SECRET_VAR),
        (&[(TOKEN_VAR, "tok-x"), (SECRET_VAR, "")], SECRET_VAR),
        (&[(TOKEN_VAR, "tok-x"), (SECRET_VAR, "sec-x"), (SECRET_FILE_VAR, "/x")], SECRET_FILE_VAR),
        (&[(TOKEN_VAR, "tok-x"), (SECRET_FILE_VAR, "/nonexistent/ledger/secret")], SECRET_FILE_VAR),
        (&[(TOKEN_VAR, "tok x"), (SECRET_VAR, "sec-x")], TOKEN_VAR),
        (&[(TOKEN_VAR, "tok-x\n"), (SECRET_VAR, "sec-x")], TOKEN_VAR),
    ];
    for (vars, named) in cases {
        let err = Credentials::from_lookup(env(vars)).unwrap_err();
        let shown = format!("{err} / {err:?}");
        assert!(shown.contains(named), "{vars:?}: {shown}");
        assert!(!shown.contains("tok-x") && !shown.contains("sec-x") && !shown.contains("tok x"), "{shown}");
    }
}

#[test]
fn secrets_print_as_stars() {
    let c = Credentials { token: Secret::new("tok-yyyyyy"), secret: Secret::new("sec-yyyyyy") };
    assert_eq!(format!("{:?}", c.token), "***");
    let config = WebhookConfig {
        url: "https://bank.example/p".into(),
        connect_timeout: Duration::from_secs(1),
        timeout: Duration::from_secs(2),
    };
    let gateway = WebhookGateway::new(config, c).unwrap();
    let shown = format!("{gateway:?} {gateway:#?}");
    assert!(!shown.contains("tok-yyyyyy") && !shown.contains("sec-yyyyyy") && shown.contains("***"), "{shown}");
    assert_eq!(gateway.redact("echo tok-yyyyyy and sec-yyyyyy".into()), "echo *** and ***");
}
