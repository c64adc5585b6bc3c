-- `holds::list`: an account's holds as payer or payee, in id order, paged by an id
-- cursor. The pending-only partial indexes cannot serve finished holds.
CREATE INDEX holds_payer_idx ON holds (payer_id, id);
CREATE INDEX holds_payee_idx ON holds (payee_id, id);
