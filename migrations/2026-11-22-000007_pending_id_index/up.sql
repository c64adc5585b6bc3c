-- The claimer walks pending jobs in id order from a cursor, so a backlog costs it an
-- index range scan per claim instead of re-reading (and filtering out) every job it
-- already queued. Rows leave this partial index as soon as they stop being pending.
CREATE INDEX withdrawals_pending_id_idx ON withdrawals (id) WHERE status = 'pending';
