ALTER TABLE idempotency_keys RESET (fillfactor);
ALTER TABLE accounts RESET (fillfactor);

DROP TRIGGER accounts_no_truncate ON accounts;
DROP TRIGGER accounts_kept ON accounts;
DROP FUNCTION ledger_keep_accounts();

ALTER FUNCTION ledger_check_postings_balanced() RESET ALL;
CREATE OR REPLACE FUNCTION ledger_check_postings_balanced() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad RECORD;
BEGIN
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

ALTER TABLE postings ADD CONSTRAINT postings_entry_id_fkey
    FOREIGN KEY (entry_id) REFERENCES journal_entries (id);
ALTER TABLE postings ADD CONSTRAINT postings_account_currency_fkey
    FOREIGN KEY (account_id, currency) REFERENCES accounts (id, currency);
