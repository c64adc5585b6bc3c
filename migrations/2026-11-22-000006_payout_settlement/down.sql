DROP INDEX payouts_due_idx;
CREATE INDEX payouts_due_idx ON payouts (next_attempt_at) WHERE status IN ('pending', 'sent');
ALTER TABLE payouts DROP CONSTRAINT payouts_resolution_matches_status;
ALTER TABLE payouts DROP COLUMN gateway_reference;
ALTER TABLE payouts DROP COLUMN resolution_entry_id;
ALTER TABLE payouts DROP CONSTRAINT payouts_status_check;
ALTER TABLE payouts ADD CONSTRAINT payouts_status_check
    CHECK (status IN ('pending', 'sent', 'settled', 'returned', 'failed'));

UPDATE withdrawals SET status = 'completed' WHERE status = 'paying_out';
ALTER TABLE withdrawals DROP CONSTRAINT withdrawals_entry_matches_status;
ALTER TABLE withdrawals ADD CONSTRAINT withdrawals_entry_matches_status
    CHECK ((status IN ('completed', 'returned')) = (entry_id IS NOT NULL));
ALTER TABLE withdrawals DROP CONSTRAINT withdrawals_status_check;
ALTER TABLE withdrawals ADD CONSTRAINT withdrawals_status_check
    CHECK (status IN ('pending', 'completed', 'rejected', 'failed', 'returned'));
