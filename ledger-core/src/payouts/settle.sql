-- Settles the payouts paid in one round (payouts::record::settle_all): one entry per
-- currency moves their sum from in transit to external settlement; each payout names it,
-- and its withdrawal is completed. $1 the payout ids, $2 the gateway references.
WITH s AS (
    SELECT x.id, x.withdrawal_id, x.currency, x.amount_minor, v.reference
    FROM unnest($1::bigint[], $2::text[]) AS v(id, reference)
    JOIN payouts x ON x.id = v.id
), c AS (
    -- numeric sum: a total beyond bigint fails the insert below, never wraps.
    SELECT currency, sum(amount_minor) AS total, count(*) AS n FROM s GROUP BY currency
), ce AS MATERIALIZED (
    -- The entry ids are drawn here, once per currency, so nothing joins back.
    SELECT c.*, nextval('journal_entries_id_seq') AS entry_id FROM c ORDER BY currency
), e AS (
    INSERT INTO journal_entries (id, kind, reference)
    -- The payouts it settles are those naming it (resolution_entry_id).
    SELECT entry_id, 'payout_settlement', 'payout-batch:' || currency || ':' || n
    FROM ce ORDER BY entry_id
    RETURNING id
), p AS (
    INSERT INTO postings (entry_id, account_id, currency, amount_minor, balance_after_minor)
    SELECT ce.entry_id, a.id, ce.currency,
           CASE a.system_role WHEN 'payouts_in_transit' THEN -ce.total ELSE ce.total END,
           NULL
    FROM ce JOIN accounts a
      ON a.currency = ce.currency AND a.system_role IN ('payouts_in_transit', 'external_settlement')
    ORDER BY ce.currency, a.system_role DESC
    RETURNING 1
), u AS (
    UPDATE payouts x SET status = 'settled', resolution_entry_id = ce.entry_id,
        gateway_reference = s.reference, claim_token = NULL, updated_at = now()
    FROM s JOIN ce ON ce.currency = s.currency WHERE x.id = s.id
    RETURNING 1
), w AS (
    -- Each withdrawal reached by id. (IS NOT DISTINCT FROM rather than =: an equality
    -- on status offers the planner the paying_out partial index as a path, and with
    -- statistics from when few were paying out it scanned all of it for every round,
    -- a cost that grew with the backlog until the dispatchers fell behind for good.)
    UPDATE withdrawals x SET status = 'completed'
    FROM s WHERE x.id = s.withdrawal_id AND x.status IS NOT DISTINCT FROM 'paying_out'
    RETURNING 1
)
SELECT (SELECT count(*) FROM e) AS entries, (SELECT count(*) FROM p) AS postings,
       (SELECT count(*) FROM u) AS payouts, (SELECT count(*) FROM w) AS withdrawals
