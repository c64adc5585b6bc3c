ALTER TABLE payouts DROP CONSTRAINT payouts_forced_return_is_a_return;
ALTER TABLE payouts DROP COLUMN forced_return_reason;
ALTER TABLE payouts DROP COLUMN possibly_sent;
ALTER TABLE payouts DROP COLUMN claim_token;
DROP SEQUENCE payout_claim_tokens;
DROP FUNCTION ledger_payout_key(BIGINT);
DROP TABLE ledger_instance;
