-- A withdrawal is both the customer's request and the worker's job.
CREATE TABLE withdrawals (
    id              BIGSERIAL PRIMARY KEY,
    account_id      BIGINT NOT NULL,
    currency        TEXT NOT NULL,
    amount_minor    BIGINT NOT NULL CHECK (amount_minor > 0),
    destination     TEXT NOT NULL CHECK (length(destination) BETWEEN 1 AND 64),
    idempotency_key TEXT NOT NULL UNIQUE CHECK (length(idempotency_key) BETWEEN 1 AND 128),
    status          TEXT NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'completed', 'rejected', 'failed', 'returned')),
    reason          TEXT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error      TEXT NULL,
    entry_id        BIGINT NULL REFERENCES journal_entries (id),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at     TIMESTAMPTZ NULL,
    CONSTRAINT withdrawals_account_currency_fkey
        FOREIGN KEY (account_id, currency) REFERENCES accounts (id, currency),
    -- Money moved if and only if the withdrawal completed (or was later returned).
    CONSTRAINT withdrawals_entry_matches_status CHECK (
        (status IN ('completed', 'returned')) = (entry_id IS NOT NULL)
    ),
    CONSTRAINT withdrawals_rejection_has_reason CHECK (
        status NOT IN ('rejected', 'failed') OR reason IS NOT NULL
    )
);

CREATE INDEX withdrawals_pending_idx ON withdrawals (id) WHERE status = 'pending';
CREATE INDEX withdrawals_account_id_idx ON withdrawals (account_id);

-- Wake the worker when work arrives: one NOTIFY per statement, not per row.
CREATE FUNCTION ledger_notify_withdrawals() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NOTIFY ledger_withdrawals;
    RETURN NULL;
END
$$;

CREATE TRIGGER withdrawals_notify AFTER INSERT ON withdrawals
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_notify_withdrawals();

-- The payout outbox: written in the same transaction that debits the account; the
-- external call happens after commit and carries idempotency_key.
CREATE TABLE payouts (
    id              BIGSERIAL PRIMARY KEY,
    withdrawal_id   BIGINT NOT NULL UNIQUE REFERENCES withdrawals (id),
    account_id      BIGINT NOT NULL REFERENCES accounts (id),
    currency        TEXT NOT NULL REFERENCES currencies (code),
    amount_minor    BIGINT NOT NULL CHECK (amount_minor > 0),
    destination     TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    status          TEXT NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'sent', 'settled', 'returned', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error      TEXT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX payouts_due_idx ON payouts (next_attempt_at) WHERE status IN ('pending', 'sent');
