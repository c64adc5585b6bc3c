//! `ledger-worker hold ...` and `account show`'s pending figures, through the binary:
//! the README's example as written, replays, and refusals under the output contract.

use super::*;

/// `--json` + `args` must fail with exit status `code`, one JSON line on stderr, and
/// the database unchanged. Returns that line.
fn hold_failure(db: &testing::TestDb, args: &[&str], code: i32) -> Value {
    let mut conn = db.conn();
    let before = testing::snapshot(&mut conn);
    let out = cli(db.url(), &[&["--json"], args].concat());
    assert_eq!(out.status.code(), Some(code), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let errors = json_lines(&out.stderr);
    assert_eq!(errors.len(), 1, "{args:?}: {errors:?}");
    assert_eq!(testing::snapshot(&mut conn), before, "{args:?} changed the database");
    errors[0].clone()
}

#[testing::test]
fn holds_are_created_posted_in_part_replayed_voided_and_shown() {
    let db = testing::committed();
    let url = db.url();
    let id = |v: &Value| v["id"].as_i64().unwrap().to_string();
    let alice = id(&ok_json(url, &["account", "open", "--owner", "alice", "--currency", "EUR"]));
    let bob = id(&ok_json(url, &["account", "open", "--owner", "bob", "--currency", "EUR"]));
    assert_eq!(alice, "117", "four system accounts per currency come first");
    ok_json(url, &["deposit", "--account", &alice, "--amount", "100.00", "--key", "dep-1"]);

    let create = ["hold", "create", "--from", &alice, "--to", &bob, "--amount", "30.00", "--key", "h-1"];
    let held = ok_json(url, &[&create[..], &["--timeout", "30s"]].concat());
    assert_eq!(
        (held["status"].as_str(), held["amount"].as_str(), held["replayed"].as_bool()),
        (Some("pending"), Some("30.00"), Some(false))
    );
    assert!(held["expires_at"].as_str().is_some(), "{held}");
    let balances = held["balances"].as_array().unwrap();
    assert_eq!(
        (balances[0]["balance"].as_str(), balances[0]["posted"].as_str(), balances[0]["pending_debits"].as_str()),
        (Some("70.00"), Some("100.00"), Some("30.00"))
    );
    assert_eq!(balances[1]["pending_credits"], "30.00");
    let hold = id(&held);
    let shown = ok_json(url, &["account", "show", &alice]);
    assert_eq!((shown["balance"].as_str(), shown["posted"].as_str()), (Some("70.00"), Some("100.00")));
    assert_eq!((shown["pending_debits"].as_str(), shown["pending_credits"].as_str()), (Some("30.00"), Some("0.00")));
    assert_eq!(ok_json(url, &["account", "show", &bob])["pending_credits"], "30.00");
    let human = cli(url, &["account", "show", &alice]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("posted 100.00 EUR, pending 30.00 EUR out, 0.00 EUR in"), "{human}");

    // The same key and request: the first hold; another request under it: a conflict.
    let again = ok_json(url, &[&create[..], &["--timeout", "30s"]].concat());
    assert_eq!(
        (id(&again), again["replayed"].as_bool(), again["entry"].clone()),
        (hold.clone(), Some(true), held["entry"].clone())
    );
    let conflict = hold_failure(&db, &create, 1);
    assert_eq!((conflict["kind"].as_str(), conflict["field"].as_str()), (Some("conflict"), Some("key")));

    // Refusals, nothing changed: (args, exit status, kind, field, id)
    let yen = id(&ok_json(url, &["account", "open", "--owner", "yen", "--currency", "JPY"]));
    let hold_n = hold.parse::<i64>().unwrap();
    type Case<'a> = (Vec<&'a str>, i32, &'a str, Option<&'a str>, Option<i64>);
    let cases: Vec<Case> = vec![
        (vec!["hold", "post", &hold, "--amount", "30.01", "--key", "p-x"], 1, "refused", Some("amount"), Some(hold_n)),
        (vec!["hold", "post", &hold, "--amount", "1 JPY", "--key", "p-x"], 2, "invalid_input", Some("amount"), None),
        (vec!["hold", "post", "424242", "--key", "p-x"], 1, "not_found", Some("hold"), Some(424242)),
        (vec!["hold", "show", "0"], 2, "invalid_input", Some("hold"), None),
        (
            vec!["hold", "create", "--from", &alice, "--to", &bob, "--amount", "70.01", "--key", "h-x"],
            1,
            "insufficient_funds",
            Some("account"),
            None,
        ),
        (
            vec!["hold", "create", "--from", &alice, "--to", &yen, "--amount", "1.00", "--key", "h-x"],
            1,
            "refused",
            Some("account"),
            None,
        ),
        (
            vec![
                "hold",
                "create",
                "--from",
                &alice,
                "--to",
                &bob,
                "--amount",
                "1.00",
                "--key",
                "h-x",
                "--timeout",
                "30",
            ],
            2,
            "invalid_input",
            Some("timeout"),
            None,
        ),
        (vec!["hold", "void", &hold], 2, "usage", None, None),
    ];
    for (args, code, kind, field, at) in &cases {
        let e = hold_failure(&db, args, *code);
        assert_eq!(e["kind"].as_str(), Some(*kind), "{args:?}: {e}");
        assert_eq!(e["field"].as_str(), *field, "{args:?}: {e}");
        if at.is_some() {
            assert_eq!(e["id"].as_i64(), *at, "{args:?}: {e}");
        }
    }

    // A partial post, replayed; then the hold is finished: a void is a conflict.
    let post = ["hold", "post", &hold, "--amount", "20.00", "--key", "p-1"];
    let posted = ok_json(url, &post);
    assert_eq!(
        (posted["status"].as_str(), posted["posted"].as_str(), posted["returned"].as_str()),
        (Some("posted"), Some("20.00"), Some("10.00"))
    );
    assert_eq!(posted["balances"][0]["balance"], "80.00");
    assert_eq!(posted["balances"][1]["balance"], "20.00");
    let replay = ok_json(url, &post);
    assert_eq!((replay["entry"].clone(), replay["replayed"].as_bool()), (posted["entry"].clone(), Some(true)));
    let finished = hold_failure(&db, &["hold", "void", &hold, "--key", "v-1"], 1);
    assert_eq!((finished["kind"].as_str(), finished["code"].as_str()), (Some("conflict"), Some("hold_finished")));
    let shown = ok_json(url, &["hold", "show", &hold]);
    assert_eq!(
        (shown["status"].as_str(), shown["resolution_entry"].clone()),
        (Some("posted"), posted["entry"].clone())
    );

    // A void gives all of it back.
    let other = ok_json(url, &["hold", "create", "--from", &alice, "--to", &bob, "--amount", "80.00", "--key", "h-2"]);
    let voided = ok_json(url, &["hold", "void", &id(&other), "--key", "v-2"]);
    assert_eq!((voided["status"].as_str(), voided["balances"][0]["balance"].as_str()), (Some("voided"), Some("80.00")));
    let human = cli(url, &["hold", "show", &id(&other)]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("voided 80.00 EUR from account 117"), "{human:?}");

    // `hold list`: both of alice's holds, oldest first, by status, paged by the cursor.
    let listed = |args: &[&str]| -> Vec<String> {
        let out = cli(url, &[&["--json", "hold", "list", "--account", &alice], args].concat());
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        json_lines(&out.stdout).iter().map(id).collect()
    };
    assert_eq!(listed(&[]), [hold.clone(), id(&other)]);
    assert_eq!(listed(&["--status", "voided"]), [id(&other)]);
    assert_eq!(listed(&["--limit", "1"]), std::slice::from_ref(&hold));
    assert_eq!(listed(&["--after", &hold]), [id(&other)]);
    assert!(listed(&["--status", "pending"]).is_empty());
    let bad = hold_failure(&db, &["hold", "list", "--account", &alice, "--status", "gone"], 2);
    assert_eq!((bad["kind"].as_str(), bad["field"].as_str()), (Some("invalid_input"), Some("status")), "{bad}");
    assert_eq!(ok_json(url, &["audit"])["clean"], true);
}
