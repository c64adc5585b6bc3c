DROP INDEX holds_payee_idx;
DROP INDEX holds_payer_idx;
