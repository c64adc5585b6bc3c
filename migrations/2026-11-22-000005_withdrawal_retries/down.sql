DROP INDEX withdrawals_pending_idx;
ALTER TABLE withdrawals DROP COLUMN next_attempt_at;
CREATE INDEX withdrawals_pending_idx ON withdrawals (id) WHERE status = 'pending';
