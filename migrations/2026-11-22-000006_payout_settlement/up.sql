-- Two-phase payouts. A processed withdrawal is 'paying_out': its funds sit in the
-- payouts-in-transit account until the payout settles (-> 'completed', funds move to
-- external settlement) or is finally rejected (-> 'returned', funds go back).
ALTER TABLE withdrawals DROP CONSTRAINT withdrawals_status_check;
ALTER TABLE withdrawals ADD CONSTRAINT withdrawals_status_check
    CHECK (status IN ('pending', 'paying_out', 'completed', 'rejected', 'failed', 'returned'));
ALTER TABLE withdrawals DROP CONSTRAINT withdrawals_entry_matches_status;
ALTER TABLE withdrawals ADD CONSTRAINT withdrawals_entry_matches_status
    CHECK ((status IN ('paying_out', 'completed', 'returned')) = (entry_id IS NOT NULL));

-- Payout states: 'pending' (to send; also while a dispatcher holds its lease),
-- 'settled', 'returned' (final rejection, funds back), 'failed' (retries exhausted:
-- an operator retries or returns it).
UPDATE payouts SET status = 'pending' WHERE status = 'sent';
ALTER TABLE payouts DROP CONSTRAINT payouts_status_check;
ALTER TABLE payouts ADD CONSTRAINT payouts_status_check
    CHECK (status IN ('pending', 'settled', 'returned', 'failed'));
ALTER TABLE payouts ADD COLUMN resolution_entry_id BIGINT NULL REFERENCES journal_entries (id);
ALTER TABLE payouts ADD COLUMN gateway_reference TEXT NULL;
ALTER TABLE payouts ADD CONSTRAINT payouts_resolution_matches_status
    CHECK ((status IN ('settled', 'returned')) = (resolution_entry_id IS NOT NULL));

DROP INDEX payouts_due_idx;
CREATE INDEX payouts_due_idx ON payouts (next_attempt_at, id) WHERE status = 'pending';
