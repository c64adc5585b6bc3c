//! What the database enforces on its own, and the schema, migrations, currencies and column mappings agreeing with the code.

use super::*;

#[testing::test]
fn the_database_itself_refuses_overdrafts_edits_and_unbalanced_entries() {
    testing::with_rollback(|conn| {
        let a = testing::funded_account(conn, "a", Currency::EUR, "1.00");
        let id = a.get();
        let e = ledger_core::transaction(conn, &TxOptions::default(), |tx| {
            tx.savepoint(|tx| {
                tx.conn().batch_execute(&format!("UPDATE accounts SET balance_minor = -1 WHERE id = {id}"))
            })
        });
        assert!(e.unwrap_err().to_string().contains("accounts_balance_floor"));

        let attempts = [
            (format!("UPDATE postings SET amount_minor = 1 WHERE account_id = {id}"), "append-only"),
            (format!("DELETE FROM postings WHERE account_id = {id}"), "append-only"),
            ("DELETE FROM journal_entries".to_string(), "append-only"),
            (
                format!(
                    "WITH e AS (INSERT INTO journal_entries (kind) VALUES ('deposit') RETURNING id)
                     INSERT INTO postings (entry_id, account_id, currency, amount_minor)
                     SELECT e.id, {id}, 'EUR', 5 FROM e"
                ),
                "unbalanced",
            ),
            (
                format!("INSERT INTO postings (entry_id, account_id, currency, amount_minor) SELECT max(id), {id}, 'USD', 1 FROM journal_entries"),
                "postings_account_currency_fkey",
            ),
            (
                format!("INSERT INTO postings (entry_id, account_id, currency, amount_minor) VALUES (-1, {id}, 'EUR', 1), (-1, {id}, 'EUR', -1)"),
                "postings_entry_id_fkey",
            ),
            (
                format!("INSERT INTO postings (entry_id, account_id, currency, amount_minor) SELECT max(id), -{id}, 'EUR', 1 FROM journal_entries"),
                "postings_account_currency_fkey",
            ),
            (format!("DELETE FROM accounts WHERE id = {id}"), "never removed"),
            (format!("UPDATE accounts SET currency = 'USD' WHERE id = {id}"), "keep their id and currency"),
            (format!("UPDATE accounts SET id = -{id} WHERE id = {id}"), "keep their id and currency"),
            ("INSERT INTO accounts (owner, currency, balance_minor) VALUES ('x', 'XXX', 0)".to_string(), "currency"),
            (
                format!("INSERT INTO withdrawals (account_id, currency, amount_minor, destination, idempotency_key, status)
                         VALUES ({id}, 'EUR', 100, 'x', 'k-status', 'completed')"),
                "withdrawals_entry_matches_status",
            ),
        ];
        refused(conn, &attempts);
        assert_audit_clean(conn);
    });
}

/// The withdrawal queue's and the payout outbox's references, checked once per
/// statement by a trigger (migration 2026-12-07-000030): the same errors and constraint
/// names the foreign keys gave, and the rows they name kept.
#[testing::test]
fn the_database_refuses_queue_rows_that_name_nothing() {
    testing::with_rollback(|conn| {
        let a = testing::funded_account(conn, "queue", Currency::EUR, "1.00");
        let w = withdrawals::withdraw(conn, &withdrawal(a, "0.40", "queue-refs")).unwrap();
        let (id, wid) = (a.get(), w.id.get());
        let pending = withdrawals::request(conn, &withdrawal(a, "0.10", "queue-pending")).unwrap().0.get();
        let new_payout = |withdrawal: i64, account: i64, currency: &str| {
            format!(
                "INSERT INTO payouts (withdrawal_id, account_id, currency, amount_minor, destination, idempotency_key)
                 VALUES ({withdrawal}, {account}, '{currency}', 10, 'x', 'queue-payout-key')"
            )
        };
        let attempts = [
            (
                format!(
                    "INSERT INTO withdrawals (account_id, currency, amount_minor, destination, idempotency_key)
                         VALUES ({id}, 'USD', 100, 'x', 'k-currency')"
                ),
                "withdrawals_account_currency_fkey",
            ),
            (
                "INSERT INTO withdrawals (account_id, currency, amount_minor, destination, idempotency_key)
                 VALUES (-5, 'EUR', 100, 'x', 'k-account')"
                    .to_string(),
                "withdrawals_account_currency_fkey",
            ),
            (
                format!("UPDATE withdrawals SET status = 'paying_out', entry_id = -9 WHERE id = {pending}"),
                "withdrawals_entry_id_fkey",
            ),
            (new_payout(-3, id, "EUR"), "payouts_withdrawal_id_fkey"),
            (new_payout(pending, id, "USD"), "payouts_account_currency_fkey"),
            (
                format!("UPDATE payouts SET status = 'settled', resolution_entry_id = -9 WHERE withdrawal_id = {wid}"),
                "payouts_resolution_entry_id_fkey",
            ),
            (format!("DELETE FROM withdrawals WHERE id = {pending}"), "never removed"),
            (format!("UPDATE withdrawals SET currency = 'USD' WHERE id = {pending}"), "keep their id, account"),
            (format!("UPDATE withdrawals SET account_id = -{id} WHERE id = {pending}"), "keep their id, account"),
            (format!("UPDATE withdrawals SET id = -{wid} WHERE id = {wid}"), "keep their id, account"),
            (
                format!("UPDATE payouts SET withdrawal_id = {pending} WHERE withdrawal_id = {wid}"),
                "keep their id, account",
            ),
            (format!("UPDATE payouts SET currency = 'USD' WHERE withdrawal_id = {wid}"), "keep their id, account"),
            (format!("UPDATE payouts SET account_id = -{id} WHERE withdrawal_id = {wid}"), "keep their id, account"),
            (format!("UPDATE payouts SET id = -id WHERE withdrawal_id = {wid}"), "keep their id, account"),
            (format!("DELETE FROM payouts WHERE withdrawal_id = {wid}"), "never removed"),
        ];
        refused(conn, &attempts);
        // What the checks let through: a payout naming a real withdrawal and its
        // account, and an entry that exists (the UPDATE names the same columns).
        let fine = [
            new_payout(pending, id, "EUR"),
            format!(
                "UPDATE payouts SET withdrawal_id = withdrawal_id, currency = currency WHERE withdrawal_id = {wid}"
            ),
            format!("UPDATE withdrawals SET account_id = account_id, currency = currency WHERE id = {pending}"),
        ];
        for sql in &fine {
            ledger_core::transaction(conn, &TxOptions::default(), |tx| tx.savepoint(|tx| tx.conn().batch_execute(sql)))
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    });
}

/// Runs each statement in a savepoint of its own; each must fail with an error that
/// contains its text.
fn refused(conn: &mut PgConnection, attempts: &[(String, &str)]) {
    for (sql, expected) in attempts {
        let msg =
            ledger_core::transaction(conn, &TxOptions::default(), |tx| tx.savepoint(|tx| tx.conn().batch_execute(sql)))
                .expect_err(sql)
                .to_string();
        assert!(msg.contains(expected), "{sql}: {msg}");
    }
}

/// On a database of its own: TRUNCATE takes exclusive locks on every table it
/// cascades to before the trigger refuses it, which would stall other tests.
#[testing::test]
fn accounts_withdrawals_and_payouts_cannot_be_truncated() {
    let db = testing::committed();
    let mut conn = db.conn();
    let a = testing::funded_account(&mut conn, "kept", Currency::EUR, "1.00");
    withdrawals::withdraw(&mut conn, &withdrawal(a, "0.40", "kept")).unwrap();
    for table in ["accounts", "withdrawals", "payouts"] {
        let sql = format!("TRUNCATE {table} CASCADE");
        let msg = conn.batch_execute(&sql).expect_err(&sql).to_string();
        assert!(msg.contains("never removed"), "{sql}: {msg}");
    }
    assert_audit_clean(&mut conn);
}

#[testing::test]
fn the_currency_table_and_the_code_agree() {
    testing::with_rollback(|conn| {
        let rows: Vec<(String, i16)> = ledger_core::schema::currencies::table
            .select((ledger_core::schema::currencies::code, ledger_core::schema::currencies::minor_units))
            .order(ledger_core::schema::currencies::code)
            .load(conn)
            .unwrap();
        let code: Vec<(String, i16)> =
            ledger_core::money::SUPPORTED_CURRENCIES.iter().map(|(c, u)| (c.to_string(), i16::from(*u))).collect();
        assert_eq!(rows, code);
    });
}

#[testing::test]
fn migrations_revert_cleanly_and_apply_again() {
    use diesel_migrations::MigrationHarness;
    let db = testing::committed();
    let mut conn = db.conn();
    let reverted = conn.revert_all_migrations(ledger_core::db::MIGRATIONS).unwrap();
    assert_eq!(reverted.len(), ledger_core::db::migration_count());
    let left: i64 = diesel::dsl::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "(SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename <> '__diesel_schema_migrations')",
    ))
    .get_result(&mut conn)
    .unwrap();
    assert_eq!(left, 0, "down.sql leaves no table behind");
    assert_eq!(ledger_core::db::run_migrations(&mut conn).unwrap(), ledger_core::db::migration_count());
    let a = testing::funded_account(&mut conn, "after-redo", Currency::EUR, "1.00");
    assert_eq!(balance(&mut conn, a), 100);
}

/// `diesel print-schema` output is committed as ledger-core/src/schema.rs and must
/// match the migrated database. This re-derives each table's column list from
/// information_schema the way print-schema does and compares it with the file.
#[testing::test]
fn the_committed_schema_file_matches_the_migrated_database() {
    let committed = include_str!("../../ledger-core/src/schema.rs");
    let mut from_file: Vec<(String, Vec<String>)> = vec![];
    let mut in_table = false;
    for line in committed.lines().map(str::trim) {
        if let Some(table) = line.strip_suffix('{').and_then(|l| l.split_once(" (")).map(|(t, _)| t.to_string()) {
            from_file.push((table, vec![]));
            in_table = true;
        } else if line == "}" {
            in_table = false;
        } else if let (true, Some((name, ty)), Some(current)) =
            (in_table, line.split_once(" -> "), from_file.last_mut())
        {
            current.1.push(format!("{name} -> {}", ty.trim_end_matches(',')));
        }
    }
    assert!(from_file.len() >= 7, "parsed {from_file:?}");
    testing::with_rollback(|conn| {
        #[derive(QueryableByName)]
        struct Col {
            #[diesel(sql_type = diesel::sql_types::Text)]
            table_name: String,
            #[diesel(sql_type = diesel::sql_types::Text)]
            column_name: String,
            #[diesel(sql_type = diesel::sql_types::Text)]
            data_type: String,
            #[diesel(sql_type = diesel::sql_types::Text)]
            is_nullable: String,
        }
        let cols: Vec<Col> = diesel::sql_query(
            "SELECT table_name::text, column_name::text, data_type::text, is_nullable::text
             FROM information_schema.columns
             WHERE table_schema = 'public' AND table_name <> '__diesel_schema_migrations'
             ORDER BY table_name, ordinal_position",
        )
        .load(conn)
        .unwrap();
        let mut from_db: Vec<(String, Vec<String>)> = vec![];
        for c in cols {
            let ty = match c.data_type.as_str() {
                "bigint" => "Int8",
                "integer" => "Int4",
                "smallint" => "Int2",
                "text" => "Text",
                "boolean" => "Bool",
                "timestamp with time zone" => "Timestamptz",
                other => panic!("no mapping for {other} (extend this test)"),
            };
            let ty = if c.is_nullable == "YES" { format!("Nullable<{ty}>") } else { ty.to_string() };
            if from_db.last().map(|(t, _)| t != &c.table_name).unwrap_or(true) {
                from_db.push((c.table_name.clone(), vec![]));
            }
            from_db.last_mut().unwrap().1.push(format!("{} -> {ty}", c.column_name));
        }
        assert_eq!(from_file, from_db, "regenerate with `diesel print-schema` (see README)");
    });
}

/// Status and kind columns map to enums (and ids to typed ids) through Diesel: every
/// variant goes into the database and comes back the same, and a text the code does
/// not know is an error when read, never a default.
#[testing::test]
fn columns_map_to_enums_and_typed_ids_and_an_unknown_value_is_an_error() {
    use diesel::sql_types::{BigInt, Text};
    use ledger_core::accounts::{AccountKind, AccountStatus};
    use ledger_core::journal::EntryKind;
    use ledger_core::payouts::PayoutStatus;
    testing::with_rollback(|conn| {
        #[derive(QueryableByName)]
        struct Kind {
            #[diesel(sql_type = Text)]
            v: AccountKind,
        }
        // Each variant written through ToSql and read back through FromSql, beside the
        // text the database holds.
        macro_rules! round_trip {
            ($ty:ty) => {{
                #[derive(QueryableByName)]
                struct Back {
                    #[diesel(sql_type = Text)]
                    v: $ty,
                    #[diesel(sql_type = Text)]
                    text: String,
                }
                for value in <$ty>::ALL {
                    let back: Back = diesel::sql_query("SELECT $1 AS v, $1 AS text")
                        .bind::<Text, _>(*value)
                        .get_result(conn)
                        .unwrap();
                    assert_eq!((back.v, back.text.as_str()), (*value, value.as_str()));
                }
            }};
        }
        round_trip!(WithdrawalStatus);
        round_trip!(PayoutStatus);
        round_trip!(AccountKind);
        round_trip!(AccountStatus);
        round_trip!(SystemRole);
        round_trip!(EntryKind);
        round_trip!(ledger_core::holds::HoldStatus);
        assert_eq!(WithdrawalStatus::ALL.len(), 6);

        let known: Kind = diesel::sql_query("SELECT 'system' AS v").get_result(conn).unwrap();
        assert_eq!(known.v, AccountKind::System);
        let unknown = diesel::sql_query("SELECT 'customer ' AS v").get_result::<Kind>(conn).map(|k| k.v).unwrap_err();
        assert!(unknown.to_string().contains("unknown AccountKind \"customer \""), "{unknown}");

        #[derive(QueryableByName)]
        struct Id {
            #[diesel(sql_type = BigInt)]
            v: AccountId,
        }
        let id: Id = diesel::sql_query("SELECT 7::bigint AS v").get_result(conn).unwrap();
        assert_eq!(id.v, AccountId::new(7).unwrap());
        assert!(diesel::sql_query("SELECT 0::bigint AS v").get_result::<Id>(conn).is_err(), "ids are positive");
        assert!(diesel::sql_query("SELECT 'customer' AS v").get_result::<Kind>(conn).is_ok());
        #[derive(QueryableByName)]
        struct Cur {
            #[diesel(sql_type = Text)]
            v: Currency,
        }
        let c: Cur = diesel::sql_query("SELECT 'JPY' AS v").get_result(conn).unwrap();
        assert_eq!(c.v, Currency::JPY);
        assert!(diesel::sql_query("SELECT 'XXX' AS v").get_result::<Cur>(conn).is_err(), "unknown currency");
    });
}
