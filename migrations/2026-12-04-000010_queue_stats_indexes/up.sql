-- Queue depths and rates for `ledger-worker status` and the metrics gauges
-- (ledger_core::stats), each read from a partial index, never from the whole table.
-- `pending` already has two (withdrawals_pending_id_idx, payouts_due_idx).

-- Depths of the other states that hold money or need an operator.
CREATE INDEX withdrawals_paying_out_idx ON withdrawals (id) WHERE status = 'paying_out';
CREATE INDEX withdrawals_failed_idx ON withdrawals (id) WHERE status = 'failed';
CREATE INDEX payouts_failed_idx ON payouts (id) WHERE status = 'failed';

-- Rates of the last minute: a range scan over the window's rows only. A withdrawal's
-- finished_at is when it left `pending` (debited, refused or failed); a payout's
-- updated_at once settled is when it settled (and its withdrawal completed).
CREATE INDEX withdrawals_finished_at_idx ON withdrawals (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX payouts_settled_at_idx ON payouts (updated_at) WHERE status = 'settled';
