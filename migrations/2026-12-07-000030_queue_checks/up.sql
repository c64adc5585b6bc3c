-- The withdrawal queue's and the payout outbox's references checked once per statement
-- instead of once per row.
--
-- Five foreign keys ran an RI trigger per row: in a debit batch of N jobs, 4N trigger
-- calls (a payout's withdrawal, account and resolution entry; a withdrawal's entry),
-- and one per withdrawal at intake. Each was an index probe and a FOR KEY SHARE lock on
-- the row it names. The locks on accounts met the batches' own FOR NO KEY UPDATE locks
-- on the same rows and became multixacts. Together they were about a third of a debit
-- batch's time (auto_explain with its triggers).
-- What they protect is kept, enforced by the structure instead:
--   - what they name never goes away or changes its key: journal entries are
--     append-only (2026-11-22-000002), accounts are kept (2026-12-07-000020), and
--     withdrawals and payouts are never deleted and keep their id (below);
--   - a withdrawal's or a payout's account and currency, and a payout's withdrawal,
--     never change after insert (below), so checking them when the row is inserted is
--     enough for ever;
--   - the entry a withdrawal or payout names is set by an UPDATE, so it is checked
--     after every INSERT and UPDATE statement, one index probe per distinct entry.
-- Each check is one pass over the statement's rows (a transition table) and fails with
-- the foreign-key error and the name of the constraint it replaces (SQLSTATE 23503).
-- The audit checks the same from the other side (`queue_off_its_references`).
ALTER TABLE withdrawals DROP CONSTRAINT withdrawals_account_currency_fkey,
                        DROP CONSTRAINT withdrawals_entry_id_fkey;
ALTER TABLE payouts DROP CONSTRAINT payouts_account_currency_fkey,
                    DROP CONSTRAINT payouts_resolution_entry_id_fkey,
                    DROP CONSTRAINT payouts_withdrawal_id_fkey;

-- The error a dropped foreign key gave.
CREATE FUNCTION ledger_refuse_reference(tbl text, constraint_name text, detail text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'insert or update on table "%" violates foreign key constraint "%"', tbl, constraint_name
        USING ERRCODE = 'foreign_key_violation', CONSTRAINT = constraint_name, TABLE = tbl, DETAIL = detail;
END
$$;

-- The rows of one statement on withdrawals or payouts (`new_rows`): on INSERT their
-- account in their currency (and a payout's withdrawal) exists; on INSERT and UPDATE
-- the entry they name exists. A correlated subquery per distinct key: an index probe,
-- never a scan of the named table.
CREATE FUNCTION ledger_check_queue_references() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad RECORD;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT d.account_id, d.currency INTO bad
        FROM (SELECT DISTINCT account_id, currency FROM new_rows) d
        WHERE (SELECT a.currency FROM accounts a WHERE a.id = d.account_id) IS DISTINCT FROM d.currency
        LIMIT 1;
        IF FOUND THEN
            PERFORM ledger_refuse_reference(TG_TABLE_NAME, TG_TABLE_NAME || '_account_currency_fkey',
                format('Key (account_id, currency)=(%s, %s) is not present in table "accounts".',
                       bad.account_id, bad.currency));
        END IF;
    END IF;
    IF TG_TABLE_NAME = 'withdrawals' THEN
        SELECT d.entry_id INTO bad
        FROM (SELECT DISTINCT entry_id FROM new_rows WHERE entry_id IS NOT NULL) d
        WHERE (SELECT e.id FROM journal_entries e WHERE e.id = d.entry_id) IS NULL
        LIMIT 1;
        IF FOUND THEN
            PERFORM ledger_refuse_reference('withdrawals', 'withdrawals_entry_id_fkey',
                format('Key (entry_id)=(%s) is not present in table "journal_entries".', bad.entry_id));
        END IF;
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        SELECT d.withdrawal_id INTO bad
        FROM (SELECT DISTINCT withdrawal_id FROM new_rows) d
        WHERE (SELECT w.id FROM withdrawals w WHERE w.id = d.withdrawal_id) IS NULL
        LIMIT 1;
        IF FOUND THEN
            PERFORM ledger_refuse_reference('payouts', 'payouts_withdrawal_id_fkey',
                format('Key (withdrawal_id)=(%s) is not present in table "withdrawals".', bad.withdrawal_id));
        END IF;
    END IF;
    SELECT d.resolution_entry_id INTO bad
    FROM (SELECT DISTINCT resolution_entry_id FROM new_rows WHERE resolution_entry_id IS NOT NULL) d
    WHERE (SELECT e.id FROM journal_entries e WHERE e.id = d.resolution_entry_id) IS NULL
    LIMIT 1;
    IF FOUND THEN
        PERFORM ledger_refuse_reference('payouts', 'payouts_resolution_entry_id_fkey',
            format('Key (resolution_entry_id)=(%s) is not present in table "journal_entries".',
                   bad.resolution_entry_id));
    END IF;
    RETURN NULL;
END
$$;

-- Public tables only (a session's temporary table must not stand in for them), and
-- always index probes, whatever plan a session would otherwise cache for a tiny table.
ALTER FUNCTION ledger_check_queue_references() SET search_path = public, pg_temp;
ALTER FUNCTION ledger_check_queue_references() SET enable_seqscan = off;
ALTER FUNCTION ledger_refuse_reference(text, text, text) SET search_path = public, pg_temp;

-- Transition tables allow one event per trigger: one trigger each for INSERT and UPDATE.
CREATE TRIGGER withdrawals_references_inserted AFTER INSERT ON withdrawals
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION ledger_check_queue_references();
CREATE TRIGGER withdrawals_references_updated AFTER UPDATE ON withdrawals
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION ledger_check_queue_references();
CREATE TRIGGER payouts_references_inserted AFTER INSERT ON payouts
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION ledger_check_queue_references();
CREATE TRIGGER payouts_references_updated AFTER UPDATE ON payouts
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION ledger_check_queue_references();

-- A withdrawal is a customer's request and a payout names it; a payout is the record
-- of money leaving: neither is ever removed. Neither changes its account or currency,
-- nor a payout its withdrawal, after insert (the checks above run at insert only). A
-- row trigger on named columns fires only for an UPDATE that sets them: never on the
-- hot paths.
CREATE FUNCTION ledger_keep_queue_rows() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.id = OLD.id AND NEW.account_id = OLD.account_id AND NEW.currency = OLD.currency THEN
        IF TG_TABLE_NAME = 'withdrawals' THEN
            RETURN NEW;
        END IF;
        -- Reached for payouts only: a withdrawal row has no such field.
        IF NEW.withdrawal_id = OLD.withdrawal_id THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION '% of % %: withdrawals and payouts are never removed, and keep their id, account, currency and withdrawal',
        TG_OP, TG_TABLE_NAME, COALESCE(OLD.id::text, 'rows')
        USING ERRCODE = 'restrict_violation';
END
$$;
-- Built-in functions and operators only (pg_catalog first): nothing a user creates
-- elsewhere can stand in for them.
ALTER FUNCTION ledger_keep_queue_rows() SET search_path = pg_catalog, pg_temp;

CREATE TRIGGER withdrawals_kept BEFORE DELETE OR UPDATE OF id, account_id, currency ON withdrawals
    FOR EACH ROW EXECUTE FUNCTION ledger_keep_queue_rows();
CREATE TRIGGER withdrawals_no_truncate BEFORE TRUNCATE ON withdrawals
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_keep_queue_rows();
CREATE TRIGGER payouts_kept BEFORE DELETE OR UPDATE OF id, withdrawal_id, account_id, currency ON payouts
    FOR EACH ROW EXECUTE FUNCTION ledger_keep_queue_rows();
CREATE TRIGGER payouts_no_truncate BEFORE TRUNCATE ON payouts
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_keep_queue_rows();
