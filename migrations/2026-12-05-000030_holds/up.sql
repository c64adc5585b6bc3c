-- Two-phase transfers (issue 12 item 4), as TigerBeetle's pending transfers: a hold
-- moves its amount from the payer to the `holds_pending` system account of its
-- currency at once (so nothing else can spend it), and is later posted (all or part
-- to the payee, the rest back to the payer), voided, or expired by the daemon (all
-- back). Every step is one balanced journal entry; this table records the hold.

-- One holds-pending account per currency, after the three seeded with the accounts
-- (on a fresh database the first customer account is now 117, no longer 88).
ALTER TABLE accounts DROP CONSTRAINT accounts_system_role_check;
ALTER TABLE accounts ADD CONSTRAINT accounts_system_role_check
    CHECK (system_role IN ('external_funding', 'payouts_in_transit', 'external_settlement', 'holds_pending'));
INSERT INTO accounts (owner, currency, kind, system_role)
SELECT 'system:holds_pending', c.code, 'system', 'holds_pending' FROM currencies c ORDER BY c.code;

ALTER TABLE journal_entries DROP CONSTRAINT journal_entries_kind_check;
ALTER TABLE journal_entries ADD CONSTRAINT journal_entries_kind_check
    CHECK (kind IN ('deposit', 'withdrawal', 'transfer', 'payout_settlement', 'payout_return',
                    'hold', 'hold_post', 'hold_void', 'hold_expiry'));

CREATE TABLE holds (
    id                  BIGSERIAL PRIMARY KEY,
    payer_id            BIGINT NOT NULL,
    payee_id            BIGINT NOT NULL,
    currency            TEXT NOT NULL,
    amount_minor        BIGINT NOT NULL CHECK (amount_minor > 0),
    -- What a post moved to the payee (the rest of amount_minor went back to the payer).
    posted_minor        BIGINT NOT NULL DEFAULT 0,
    status              TEXT NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'posted', 'voided', 'expired')),
    -- When the daemon voids it (status expired) if it is still pending; NULL: never.
    expires_at          TIMESTAMPTZ NULL,
    idempotency_key     TEXT NOT NULL UNIQUE CHECK (length(idempotency_key) BETWEEN 1 AND 128),
    -- The entry that moved the amount into holds_pending, and the one that moved it out.
    hold_entry_id       BIGINT NOT NULL UNIQUE REFERENCES journal_entries (id),
    resolution_entry_id BIGINT NULL UNIQUE REFERENCES journal_entries (id),
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at         TIMESTAMPTZ NULL,
    CONSTRAINT holds_payer_currency_fkey FOREIGN KEY (payer_id, currency) REFERENCES accounts (id, currency),
    CONSTRAINT holds_payee_currency_fkey FOREIGN KEY (payee_id, currency) REFERENCES accounts (id, currency),
    CONSTRAINT holds_two_accounts CHECK (payer_id <> payee_id),
    CONSTRAINT holds_posted_within_amount CHECK (posted_minor BETWEEN 0 AND amount_minor),
    -- Money reached the payee if and only if the hold was posted.
    CONSTRAINT holds_posted_matches_status CHECK ((status = 'posted') = (posted_minor > 0)),
    -- A finished hold has its resolution entry and its time; a pending one neither.
    CONSTRAINT holds_resolution_matches_status CHECK (
        (status = 'pending') = (resolution_entry_id IS NULL)
        AND (status = 'pending') = (finished_at IS NULL)
    ),
    CONSTRAINT holds_expired_had_a_timeout CHECK (status <> 'expired' OR expires_at IS NOT NULL)
);

-- The expiry loop pops due holds from the head of this index (FOR UPDATE SKIP LOCKED).
CREATE INDEX holds_due_idx ON holds (expires_at, id) WHERE status = 'pending' AND expires_at IS NOT NULL;
-- An account's pending debits and credits, read from the pending holds only.
CREATE INDEX holds_pending_payer_idx ON holds (payer_id) WHERE status = 'pending';
CREATE INDEX holds_pending_payee_idx ON holds (payee_id) WHERE status = 'pending';
