-- A job that failed for a non-business reason waits before its next attempt, so a
-- persistent fault does not spin; the claimer only takes jobs whose time has come.
ALTER TABLE withdrawals ADD COLUMN next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now();

DROP INDEX withdrawals_pending_idx;
CREATE INDEX withdrawals_pending_idx ON withdrawals (next_attempt_at, id) WHERE status = 'pending';
