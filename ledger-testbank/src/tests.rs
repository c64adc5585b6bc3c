//! The bank: pays each key once, checks every signature, answers lookups, keeps
//! connections alive when asked to, and can stop answering.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::auth::hex_decode;
use super::http::percent_decode;
use super::*;

/// A payout body as the contract has it, for key `k1`.
fn payout_body(withdrawal_id: i64) -> String {
    format!(
        r#"{{"idempotency_key":"k1","payout_id":1,"withdrawal_id":{withdrawal_id},"amount":"1.00","amount_minor":100,"currency":"EUR","destination":"DE89370400440532013000"}}"#
    )
}

fn sign(secret: &str, t: u64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

/// Sends one request on a kept-alive connection and reads one response.
fn call(stream: &mut TcpStream, method: &str, path: &str, body: &str, token: &str, secret: &str) -> String {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: bank\r\nAuthorization: Bearer {token}\r\nLedger-Signature: {}\r\n\
         Idempotency-Key: k1\r\nContent-Length: {}\r\n\r\n{body}",
        sign(secret, t, body),
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0_u8; 4096];
    loop {
        let k = stream.read(&mut chunk).unwrap();
        assert!(k > 0, "the bank closed the connection");
        got.extend_from_slice(&chunk[..k]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

#[ledger_testdb::test]
fn pays_once_per_key_over_one_kept_alive_connection_and_refuses_bad_credentials() {
    let bank = Bank::start(BankConfig::fast("tok", "sec", Duration::from_millis(1))).unwrap();
    let mut stream = TcpStream::connect(bank.addr()).unwrap();
    let body = &payout_body(7);
    for _ in 0..2 {
        let paid = call(&mut stream, "POST", "/payouts", body, "tok", "sec");
        assert!(paid.starts_with("HTTP/1.1 200") && paid.contains(r#""reference":"bench-bank-1""#), "{paid}");
    }
    let found = call(&mut stream, "GET", "/payouts/k1", "", "tok", "sec");
    assert!(found.starts_with("HTTP/1.1 200") && found.contains("accepted"), "{found}");
    let missing = call(&mut stream, "GET", "/payouts/k%32", "", "tok", "sec");
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let wrong_secret = call(&mut stream, "GET", "/payouts/k1", "", "tok", "nope");
    assert!(wrong_secret.starts_with("HTTP/1.1 401"), "{wrong_secret}");
    let wrong_token = call(&mut stream, "POST", "/payouts", body, "nope", "sec");
    assert!(wrong_token.starts_with("HTTP/1.1 401"), "{wrong_token}");
    let reused = call(&mut stream, "POST", "/payouts", &payout_body(8), "tok", "sec");
    assert!(reused.starts_with("HTTP/1.1 409"), "{reused}");
    let s = bank.stats();
    assert_eq!((s.posts, s.paid, s.replays, s.lookups, s.auth_failures, s.bad_requests), (3, 1, 1, 2, 2, 1));
    assert_eq!(s.connections, 1);
    assert_eq!(bank.violations(), vec![Violation::KeyReused { key: "k1".into() }]);
    drop(stream);
    drop(bank);
}

/// The worker's webhook gateway (the contract's client side) is paid by this bank:
/// signed and authenticated, once per key, answered the same on a replay, found by a
/// lookup, and over kept-alive connections.
#[ledger_testdb::test]
fn the_webhook_gateway_is_paid_once_per_key() {
    use ledger_core::payouts::{LookupOutcome, PayoutGateway, PayoutRequest, SendOutcome};
    use ledger_core::{PayoutId, WithdrawalId};
    use ledger_worker::webhook::{Credentials, Secret, WebhookConfig, WebhookGateway};

    let bank = Bank::start(BankConfig::fast("tok-bench-1", "sec-bench-1", Duration::ZERO)).unwrap();
    let config = WebhookConfig {
        url: bank.url().to_string(),
        connect_timeout: Duration::from_secs(2),
        timeout: Duration::from_secs(5),
    };
    let credentials = Credentials { token: Secret::new("tok-bench-1"), secret: Secret::new("sec-bench-1") };
    let gateway = WebhookGateway::new(config.clone(), credentials).unwrap();
    let request = |i: i64| PayoutRequest {
        payout: PayoutId::new(i).unwrap(),
        withdrawal: WithdrawalId::new(i).unwrap(),
        amount_minor: 1_000 + i,
        amount: format!("{}.{:02}", (1_000 + i) / 100, (1_000 + i) % 100),
        currency: "EUR".into(),
        destination: "DE89370400440532013000".into(),
        idempotency_key: format!("payout-bench-w{i}"),
        attempt: 1,
        token: i,
        possibly_sent: false,
    };
    assert_eq!(gateway.lookup(&request(1)), LookupOutcome::NotFound);
    let first = gateway.send(&request(1));
    assert_eq!(first, SendOutcome::Accepted { reference: Some("bench-bank-1".into()) });
    assert_eq!(gateway.send(&request(1)), first, "a replay answers the same");
    assert!(matches!(gateway.lookup(&request(1)), LookupOutcome::Accepted { .. }));
    for i in 2..=50 {
        assert!(matches!(gateway.send(&request(i)), SendOutcome::Accepted { .. }));
    }
    let s = bank.stats();
    assert_eq!((s.posts, s.paid, s.replays, s.lookups, s.failures()), (51, 50, 1, 2, 0));
    assert_eq!(s.connections, 1, "one client, one kept-alive connection");

    let stranger = Credentials { token: Secret::new("tok-bench-1"), secret: Secret::new("wrong-secret") };
    let stranger = WebhookGateway::new(config, stranger).unwrap();
    assert!(matches!(stranger.send(&request(99)), SendOutcome::Unauthorized { .. }));
    assert_eq!((bank.stats().auth_failures, bank.stats().paid), (1, 50));
}

#[test]
fn decodes_hex_and_percent() {
    assert_eq!(hex_decode("00ff10"), Some(vec![0, 255, 16]));
    assert_eq!(hex_decode("0"), None);
    assert_eq!(hex_decode("zz"), None);
    assert_eq!(percent_decode("a%20b%2Fc").as_deref(), Some("a b/c"));
    assert_eq!(percent_decode("a%2"), None);
    assert_eq!(random_hex(16).len(), 32);
}

/// The tests' bank closes every connection after one answer, and a hanging bank reads a
/// request, records its key, never answers, and still stops at once when dropped.
#[ledger_testdb::test]
fn one_request_per_connection_and_a_hanging_bank_never_answers() {
    let bank = Bank::start(BankConfig { token: "tok".into(), secret: "sec".into(), ..BankConfig::default() }).unwrap();
    let mut stream = TcpStream::connect(bank.addr()).unwrap();
    let found = call(&mut stream, "GET", "/payouts/k1", "", "tok", "sec");
    assert!(found.starts_with("HTTP/1.1 404") && found.contains("Connection: close"), "{found}");
    let mut rest = Vec::new();
    assert_eq!(stream.read_to_end(&mut rest).unwrap(), 0, "the bank closed the connection");

    bank.set_hang(true);
    let mut hung = TcpStream::connect(bank.addr()).unwrap();
    hung.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let body = payout_body(7);
    write!(hung, "POST /payouts HTTP/1.1\r\nIdempotency-Key: k1\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while bank.hung_keys().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(bank.hung_keys(), vec!["k1".to_string()]);
    let silent = hung.read(&mut [0_u8; 64]).unwrap_err();
    assert!(matches!(silent.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{silent}");
    assert!(bank.wait_idle(Duration::from_secs(5)), "a held connection takes no connection thread");
    assert_eq!((bank.stats().paid, bank.violations()), (0, vec![]), "nothing was done");
    let started = Instant::now();
    drop(bank);
    assert!(started.elapsed() < Duration::from_secs(2), "the bank stopped at once: {:?}", started.elapsed());
    assert_eq!(hung.read(&mut [0_u8; 64]).unwrap(), 0, "a stopped bank closes what it held");
}

#[test]
fn a_bad_configuration_is_a_typed_error() {
    let too_many = Faults { server_error_pct: 60, drop_before_pct: 50, ..Faults::none() };
    let err = Bank::start(BankConfig { faults: too_many.clone(), ..BankConfig::default() }).err().unwrap();
    assert!(matches!(&err, BankError::BadConfig(why) if why.contains("more than 100")), "{err}");
    let bank = Bank::start(BankConfig::default()).unwrap();
    assert!(matches!(bank.set_faults(too_many), Err(BankError::BadConfig(_))));
    assert!(Bank::start(BankConfig { max_connections: 0, ..BankConfig::default() }).is_err());
}
