//! The embedding example (`examples/embed.rs`) run small against a fresh database: every
//! mode, chain, hold and currency check it makes passes, and its balance check can fail.

use diesel::RunQueryDsl;
use ledger_testdb as testing;

#[path = "../examples/embed.rs"]
#[allow(dead_code)]
mod embed;

#[testing::test(600)]
fn the_embedding_example_runs_and_its_balance_check_can_fail() {
    let db = testing::committed();
    let cfg = embed::Config {
        accounts: 50,
        transfers: 400,
        threads: 4,
        batch: 50,
        holds_per_thread: 12,
        committers: 2,
        linger_us: 1_000,
        pgbench_seconds: 0,
    };
    let outcome = embed::run_on(db.url(), &cfg, None).expect("the example's checks pass");
    let modes: Vec<&str> = outcome.rates.iter().map(|r| r.mode).collect();
    assert_eq!(modes, ["transfer", "transfer coalesced", "transfer batch"]);
    assert!(outcome.rates.iter().all(|r| r.per_sec > 0.0), "{:?}", outcome.rates);
    assert_eq!(outcome.balances_checked, 50);

    // Negative control: one minor unit more on the first account than the answers said.
    let mut conn = db.conn();
    let first = outcome.expected.first();
    diesel::sql_query(format!("UPDATE accounts SET balance_minor = balance_minor + 1 WHERE id = {first}"))
        .execute(&mut conn)
        .unwrap();
    let err = embed::check(&mut conn, &outcome.expected).expect_err("a changed balance must fail the check");
    assert!(err.to_string().contains(&format!("account {first}: balance")), "{err:#}");
}
