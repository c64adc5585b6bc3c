DROP INDEX payouts_settled_at_idx;
DROP INDEX withdrawals_finished_at_idx;
DROP INDEX payouts_failed_idx;
DROP INDEX withdrawals_failed_idx;
DROP INDEX withdrawals_paying_out_idx;
