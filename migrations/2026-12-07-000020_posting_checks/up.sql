-- A posting's references checked once per INSERT statement instead of once per row.
--
-- The two foreign keys of `postings` ran two RI triggers per posting: an index probe
-- each, and a FOR KEY SHARE lock on the entry row (a WAL record per posting). In a
-- batch of 500 transfers that was 2,000 trigger calls and a third of the statement's
-- time. What they protect is kept, enforced by the structure instead:
--   - an entry can never go away or change (journal_entries is append-only: its
--     triggers refuse UPDATE, DELETE and TRUNCATE), and an account can never go away
--     or change its id or currency (the triggers below), so checking that a posting's
--     entry and account exist when the posting is inserted is enough forever after;
--   - that check runs in the statement-level trigger that already checks the entries
--     are balanced, as one pass over the statement's new postings, and fails with the
--     foreign-key error and constraint name the dropped constraints gave (23503).
-- The audit checks the same from the other side (postings without their entry or
-- account: `audit`'s postings_off_their_references).
ALTER TABLE postings DROP CONSTRAINT postings_entry_id_fkey;
ALTER TABLE postings DROP CONSTRAINT postings_account_currency_fkey;

CREATE OR REPLACE FUNCTION ledger_check_postings_balanced() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad RECORD;
BEGIN
    -- One index probe per distinct entry and per distinct account (a correlated
    -- subquery, never a scan of either table): every entry exists, and every account
    -- exists in the posting's currency.
    SELECT d.entry_id INTO bad
    FROM (SELECT DISTINCT entry_id FROM new_postings) d
    WHERE (SELECT e.id FROM journal_entries e WHERE e.id = d.entry_id) IS NULL
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert or update on table "postings" violates foreign key constraint "postings_entry_id_fkey"'
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'postings_entry_id_fkey', TABLE = 'postings',
                  DETAIL = format('Key (entry_id)=(%s) is not present in table "journal_entries".', bad.entry_id);
    END IF;
    SELECT d.account_id, d.currency INTO bad
    FROM (SELECT DISTINCT account_id, currency FROM new_postings) d
    WHERE (SELECT a.currency FROM accounts a WHERE a.id = d.account_id) IS DISTINCT FROM d.currency
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert or update on table "postings" violates foreign key constraint "postings_account_currency_fkey"'
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'postings_account_currency_fkey', TABLE = 'postings',
                  DETAIL = format('Key (account_id, currency)=(%s, %s) is not present in table "accounts".',
                                  bad.account_id, bad.currency);
    END IF;

    SELECT n.entry_id, n.currency, sum(n.amount_minor) AS total INTO bad
    FROM new_postings n
    GROUP BY n.entry_id, n.currency
    HAVING sum(n.amount_minor) <> 0
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'journal entry % is unbalanced in %: its postings sum to %',
            bad.entry_id, bad.currency, bad.total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
$$;

-- Its tables resolved in public only (a session's temporary table named accounts or
-- journal_entries must not stand in for them; pg_temp last), and its lookups always
-- index probes, whatever plan a session would otherwise cache for a tiny table.
ALTER FUNCTION ledger_check_postings_balanced() SET search_path = public, pg_temp;
ALTER FUNCTION ledger_check_postings_balanced() SET enable_seqscan = off;

-- Accounts are closed, never removed: postings name them for ever. Their id and
-- currency never change (a posting's currency is its account's).
CREATE FUNCTION ledger_keep_accounts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.id = OLD.id AND NEW.currency = OLD.currency THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION '% of account %: accounts are closed, never removed, and keep their id and currency',
        TG_OP, COALESCE(OLD.id::text, 'rows')
        USING ERRCODE = 'restrict_violation';
END
$$;

CREATE TRIGGER accounts_kept BEFORE DELETE OR UPDATE OF id, currency ON accounts
    FOR EACH ROW EXECUTE FUNCTION ledger_keep_accounts();
CREATE TRIGGER accounts_no_truncate BEFORE TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_keep_accounts();

-- The balance and idempotency-result updates of the hot paths change no indexed
-- column: room on their page lets them be HOT updates (no new index entries).
ALTER TABLE accounts SET (fillfactor = 50);
ALTER TABLE idempotency_keys SET (fillfactor = 70);
