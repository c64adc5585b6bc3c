-- Payouts that leave exactly once (issue 10).

-- This ledger's identity, created once by `migrate`. It is part of every new payout's
-- gateway key, so two databases (staging and production sharing gateway credentials,
-- a re-created database) never send the same key for different payouts.
CREATE TABLE ledger_instance (
    singleton   BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    instance_id TEXT NOT NULL CHECK (instance_id ~ '^[0-9a-f]{32}$'),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO ledger_instance (instance_id) VALUES (replace(gen_random_uuid()::text, '-', ''));

-- The one place a payout's gateway key is made. Stored in payouts.idempotency_key when
-- the payout is queued and never recomputed: payouts queued before this migration keep
-- the key they may already have been sent with.
CREATE FUNCTION ledger_payout_key(withdrawal_id BIGINT) RETURNS TEXT
LANGUAGE sql STABLE AS $$
    SELECT 'payout-' || instance_id || '-w' || withdrawal_id FROM ledger_instance
$$;

-- Fencing: every claim of a payout takes a new token from this sequence (a sequence
-- never hands out a value twice, whatever `retry` or `release` do to the attempts),
-- and an answer is recorded only under the payout's current token.
CREATE SEQUENCE payout_claim_tokens;
ALTER TABLE payouts ADD COLUMN claim_token BIGINT NULL;

-- True once a call may have reached the gateway without our recording its answer (set
-- when the payout is claimed, before the call). Such a payout is refunded only after a
-- lookup at the gateway says it was rejected or never received.
ALTER TABLE payouts ADD COLUMN possibly_sent BOOLEAN NOT NULL DEFAULT false;
-- (The old `payout retry` reset attempts to 0 but kept last_error: that one was sent too.)
UPDATE payouts SET possibly_sent = true WHERE attempts > 0 OR last_error IS NOT NULL;

-- An operator's return without a confirming lookup (`payout return --force`), and why.
ALTER TABLE payouts ADD COLUMN forced_return_reason TEXT NULL;
ALTER TABLE payouts ADD CONSTRAINT payouts_forced_return_is_a_return
    CHECK (forced_return_reason IS NULL OR status = 'returned');
