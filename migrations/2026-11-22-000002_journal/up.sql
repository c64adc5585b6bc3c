-- Double-entry journal. An entry is one movement of money; its postings sum to zero
-- per currency. A posting's amount is signed: positive raises the account's balance.
CREATE TABLE journal_entries (
    id         BIGSERIAL PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('deposit', 'withdrawal', 'transfer', 'payout_settlement', 'payout_return')),
    reference  TEXT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE postings (
    id                  BIGSERIAL PRIMARY KEY,
    entry_id            BIGINT NOT NULL REFERENCES journal_entries (id),
    account_id          BIGINT NOT NULL,
    currency            TEXT NOT NULL,
    amount_minor        BIGINT NOT NULL CHECK (amount_minor <> 0),
    -- The account's balance right after this posting (customer accounts only).
    balance_after_minor BIGINT NULL,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT postings_account_currency_fkey
        FOREIGN KEY (account_id, currency) REFERENCES accounts (id, currency)
);

CREATE INDEX postings_entry_id_idx ON postings (entry_id);
CREATE INDEX postings_account_id_id_idx ON postings (account_id, id);

-- The journal is append-only: corrections are new entries, never edits.
CREATE FUNCTION ledger_reject_journal_mutation() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% on % is not allowed: the journal is append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END
$$;

CREATE TRIGGER postings_append_only BEFORE UPDATE OR DELETE ON postings
    FOR EACH ROW EXECUTE FUNCTION ledger_reject_journal_mutation();
CREATE TRIGGER postings_no_truncate BEFORE TRUNCATE ON postings
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_reject_journal_mutation();
CREATE TRIGGER journal_entries_append_only BEFORE UPDATE OR DELETE ON journal_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_reject_journal_mutation();
CREATE TRIGGER journal_entries_no_truncate BEFORE TRUNCATE ON journal_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_reject_journal_mutation();

-- Every INSERT statement into postings must leave each entry it touches balanced per
-- currency. ledger-core writes all postings of an entry in one statement, so this is
-- checked once per entry, not once per row.
CREATE FUNCTION ledger_check_postings_balanced() RETURNS trigger
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

CREATE TRIGGER postings_balanced AFTER INSERT ON postings
    REFERENCING NEW TABLE AS new_postings
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_check_postings_balanced();
