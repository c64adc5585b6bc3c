-- Claims a batch's idempotency keys (batch_plan::claim_keys) for one operation ($3:
-- 'transfer', 'deposit', 'withdrawal'). $1 the distinct keys in ascending byte order,
-- $2 their first request's fingerprint. Rows go in that order, so two batches sharing
-- keys wait for each other's keys in one order and never deadlock; a key another open
-- transaction holds is waited for, as in idempotency::begin. Returns the keys this
-- call inserted (fresh).
INSERT INTO idempotency_keys (key, operation, request_fingerprint)
SELECT k, $3, f
FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(k, f, n)
ORDER BY n
ON CONFLICT DO NOTHING
RETURNING key
