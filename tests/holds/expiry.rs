//! The expiry, and posts, voids and expiry rounds racing on real concurrent connections.

use super::*;

/// A hold of `amount` whose timeout has already passed (1 ms, then a wait past it).
fn due_hold(conn: &mut PgConnection, from: AccountId, to: AccountId, amount: &str) -> HoldId {
    let r = HoldRequest { timeout: Some(Timeout::from_ms(1).unwrap()), ..req(from, to, amount) };
    let id = holds::hold(conn, &r).unwrap().hold.id;
    thread::sleep(Duration::from_millis(5));
    id
}

#[testing::test]
fn the_expiry_returns_due_holds_only_in_bounded_batches() {
    testing::with_rollback(|conn| {
        let payer = testing::funded_account(conn, "payer", Currency::EUR, "100.00");
        let payee = testing::funded_account(conn, "payee", Currency::EUR, "0.00");
        let later = HoldRequest { timeout: Some(Timeout::parse("1h").unwrap()), ..req(payer, payee, "1.00") };
        let later = holds::hold(conn, &later).unwrap().hold.id;
        let never = hold(conn, payer, payee, "2.00").hold.id;
        let due: Vec<HoldId> = (0..3).map(|_| due_hold(conn, payer, payee, "3.00")).collect();
        assert_eq!(balance(conn, payer), 10_000 - 100 - 200 - 900);
        let first = holds::expire_due(conn, 2).unwrap();
        assert_eq!(first.iter().map(|e| e.hold).collect::<Vec<_>>(), due[..2], "earliest deadlines first");
        assert_eq!((first[1].returned_minor, first[1].payer_balance_minor), (300, 8_800 + 600));
        let rest = holds::expire_due(conn, 1_000).unwrap();
        assert_eq!(rest.iter().map(|e| e.hold).collect::<Vec<_>>(), due[2..]);
        assert!(holds::expire_due(conn, 10).unwrap().is_empty());
        for id in &due {
            let h = holds::get(conn, *id).unwrap();
            assert_eq!((h.status, h.returned_minor()), (HoldStatus::Expired, 300));
        }
        for id in [later, never] {
            assert_eq!(holds::get(conn, id).unwrap().status, HoldStatus::Pending);
        }
        assert_eq!(figures(conn, payer), (9_700, 300, 0));
        for bad in [0, holds::MAX_EXPIRY_BATCH + 1] {
            assert_eq!(holds::expire_due(conn, bad).unwrap_err().code(), "invalid_input");
        }
        assert_audit_clean(conn);
    });
}

/// The post and the expiry of due holds, released together on real connections: for
/// each hold exactly one wins, and the money adds up to the cent.
#[testing::test]
fn a_post_racing_the_expiry_ends_with_exactly_one_winner() {
    const ROUNDS: usize = 30;
    let db = testing::committed();
    let mut setup = db.conn();
    let payer = testing::funded_account(&mut setup, "payer", Currency::EUR, "1000.00");
    let payee = testing::funded_account(&mut setup, "payee", Currency::EUR, "0.00");
    let (mut poster, mut expirer) = (db.conn(), db.conn());
    let (mut posts_won, mut expiries_won, mut posted_minor) = (0, 0, 0);
    for round in 0..ROUNDS {
        let id = due_hold(&mut setup, payer, payee, "10.00");
        let start = Barrier::new(2);
        let (post, expired) = thread::scope(|s| {
            let post = s.spawn(|| {
                start.wait();
                holds::post(&mut poster, id, Some(eur("7.50")), &key("race-post"))
            });
            let expiry = s.spawn(|| {
                start.wait();
                holds::expire_due(&mut expirer, 10)
            });
            (post.join().unwrap(), expiry.join().unwrap().unwrap())
        });
        let expired_it = expired.iter().any(|e| e.hold == id);
        match post {
            Ok(r) => {
                assert!(!expired_it, "round {round}: posted and expired");
                assert_eq!(r.hold.status, HoldStatus::Posted);
                posts_won += 1;
                posted_minor += 750;
            }
            Err(LedgerError::HoldFinished { status: HoldStatus::Expired, .. }) => {
                assert!(expired_it, "round {round}: refused as expired, but the expiry did not expire it");
                expiries_won += 1;
            }
            Err(e) => panic!("round {round}: {e}"),
        }
        // Whoever lost, the next expiry round finds nothing left of this hold.
        assert!(holds::expire_due(&mut setup, 10).unwrap().is_empty());
    }
    eprintln!("post won {posts_won}, expiry won {expiries_won} of {ROUNDS}");
    assert_eq!(posts_won + expiries_won, ROUNDS);
    assert_eq!(balance(&mut setup, payer), 100_000 - posted_minor);
    assert_eq!(balance(&mut setup, payee), posted_minor);
    assert_eq!(holds::pending_minor(&mut setup, payer).unwrap(), 0);
    assert_audit_clean(&mut setup);
}

/// Both orders of the race, forced: the expiry holding the row makes the post wait and
/// then refuse; a post holding the row is skipped by the expiry, which never waits.
#[testing::test]
fn whoever_holds_the_row_first_wins_and_the_other_never_moves_money() {
    let db = testing::committed();
    let mut setup = db.conn();
    let payer = testing::funded_account(&mut setup, "payer", Currency::EUR, "100.00");
    let payee = testing::funded_account(&mut setup, "payee", Currency::EUR, "0.00");
    let (mut a, mut b, mut observer) = (db.conn(), db.conn(), db.conn());
    let (pid_a, pid_b) = (testing::backend_pid(&mut a), testing::backend_pid(&mut b));

    // 1. The expiry locks the hold first; the post waits for it, then finds it expired.
    let first = due_hold(&mut setup, payer, payee, "10.00");
    let (locked_tx, locked_rx) = std::sync::mpsc::sync_channel(0);
    let (release_tx, release_rx) = std::sync::mpsc::sync_channel(0);
    let refused = thread::scope(|s| {
        let b = &mut b;
        s.spawn(move || {
            ledger_core::transaction(b, &TxOptions::no_retry(), |tx| {
                let expired = holds::expire_due_tx(tx, 10)?;
                assert_eq!(expired.len(), 1);
                locked_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                Ok::<_, LedgerError>(())
            })
            .unwrap();
        });
        locked_rx.recv().unwrap();
        let post = s.spawn(|| holds::post(&mut a, first, None, &key("late")));
        testing::wait_until_blocked(&mut observer, pid_a, pid_b, Duration::from_secs(30)).unwrap();
        release_tx.send(()).unwrap();
        post.join().unwrap()
    });
    assert!(matches!(refused, Err(LedgerError::HoldFinished { status: HoldStatus::Expired, .. })), "{refused:?}");

    // 2. A post holds the row (its transaction still open): the expiry skips it at once.
    let second = due_hold(&mut setup, payer, payee, "20.00");
    let (locked_tx, locked_rx) = std::sync::mpsc::sync_channel(0);
    let (release_tx, release_rx) = std::sync::mpsc::sync_channel(0);
    thread::scope(|s| {
        let a = &mut a;
        s.spawn(move || {
            ledger_core::transaction(a, &TxOptions::no_retry(), |tx| {
                holds::post_tx(tx, second, None, &key("early"))?;
                locked_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                Ok::<_, LedgerError>(())
            })
            .unwrap();
        });
        locked_rx.recv().unwrap();
        assert!(holds::expire_due(&mut b, 10).unwrap().is_empty(), "a hold being posted is skipped");
        release_tx.send(()).unwrap();
    });
    assert!(holds::expire_due(&mut b, 10).unwrap().is_empty(), "and once posted it is never due");
    assert_eq!(holds::get(&mut setup, second).unwrap().status, HoldStatus::Posted);
    assert_eq!((balance(&mut setup, payer), balance(&mut setup, payee)), (8_000, 2_000));
    assert_audit_clean(&mut setup);
}

/// Many holds on a few payers: posts, voids and two expiry loops at once, on real
/// connections. Every hold ends exactly once, no deadlock is left unresolved (the
/// expiry locks its payers in ascending order), and the audit is clean.
#[testing::test]
fn posts_voids_and_two_expiry_rounds_at_once_settle_every_hold_exactly_once() {
    const HOLDS: usize = 60;
    let db = testing::committed();
    let mut setup = db.conn();
    let payers: Vec<AccountId> =
        (0..4).map(|i| testing::funded_account(&mut setup, &format!("p{i}"), Currency::EUR, "100.00")).collect();
    let payee = testing::funded_account(&mut setup, "payee", Currency::EUR, "0.00");
    let ids: Vec<HoldId> = (0..HOLDS).map(|i| due_hold(&mut setup, payers[i % 4], payee, "1.00")).collect();
    let start = Barrier::new(4);
    let (posted, voided) = thread::scope(|s| {
        let expirers: Vec<_> = (0..2)
            .map(|_| {
                let (start, mut conn) = (&start, db.conn());
                s.spawn(move || {
                    start.wait();
                    let mut n = 0;
                    loop {
                        let got = holds::expire_due(&mut conn, 7).unwrap().len();
                        n += got;
                        if got == 0 {
                            return n;
                        }
                    }
                })
            })
            .collect();
        let writer = |even: bool| {
            let (start, ids, mut conn) = (&start, &ids, db.conn());
            s.spawn(move || {
                start.wait();
                let mut done = 0;
                for id in ids.iter().skip(usize::from(!even)).step_by(2).rev() {
                    let r = if even {
                        holds::post(&mut conn, *id, None, &key("m-post"))
                    } else {
                        holds::void(&mut conn, *id, &key("m-void"))
                    };
                    match r {
                        Ok(_) => done += 1,
                        Err(LedgerError::HoldFinished { status: HoldStatus::Expired, .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                done
            })
        };
        let (posts, voids) = (writer(true), writer(false));
        let expired: usize = expirers.into_iter().map(|h| h.join().unwrap()).sum();
        let (posted, voided) = (posts.join().unwrap(), voids.join().unwrap());
        assert_eq!(posted + voided + expired, HOLDS, "every hold ended exactly once");
        (posted, voided)
    });
    eprintln!("posted {posted}, voided {voided}, expired {}", HOLDS - posted - voided);
    let statuses: Vec<HoldStatus> = ids.iter().map(|id| holds::get(&mut setup, *id).unwrap().status).collect();
    assert!(statuses.iter().all(|s| *s != HoldStatus::Pending));
    assert_eq!(statuses.iter().filter(|s| **s == HoldStatus::Posted).count(), posted);
    assert_eq!(balance(&mut setup, payee), posted as i64 * 100);
    let left: i64 = payers.iter().map(|p| balance(&mut setup, *p)).sum();
    assert_eq!(left, 40_000 - posted as i64 * 100);
    assert_audit_clean(&mut setup);
}
