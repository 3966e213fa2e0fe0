-- CDM: the counter marts.  A row exists exactly while its order_cnt is
-- positive, so that counting rows counts users.  fillfactor leaves room for
-- HOT updates of order_cnt.

CREATE TABLE cdm.user_product_counters (
    id          bigserial PRIMARY KEY,
    user_id     uuid NOT NULL,
    product_id  uuid NOT NULL,
    product_name varchar NOT NULL,
    order_cnt   integer NOT NULL CHECK (order_cnt >= 0),
    UNIQUE (user_id, product_id)
) WITH (fillfactor = 80);
-- Renames update every row of a dish; analysts ask "who ordered dish X".
CREATE INDEX user_product_counters_product_id_idx
    ON cdm.user_product_counters (product_id);
COMMENT ON TABLE cdm.user_product_counters IS 'Orders per user per dish: distinct CLOSED orders of the user that contain the dish';
COMMENT ON COLUMN cdm.user_product_counters.id IS 'Surrogate row number';
COMMENT ON COLUMN cdm.user_product_counters.user_id IS 'The user: dds.h_user.h_user_pk';
COMMENT ON COLUMN cdm.user_product_counters.product_id IS 'The dish: dds.h_product.h_product_pk';
COMMENT ON COLUMN cdm.user_product_counters.product_name IS 'The dish''s latest name (from a menu or an order, whichever is newest)';
COMMENT ON COLUMN cdm.user_product_counters.order_cnt IS 'Number of the user''s CLOSED orders containing the dish (quantity does not matter)';

CREATE TABLE cdm.user_category_counters (
    id          bigserial PRIMARY KEY,
    user_id     uuid NOT NULL,
    category_id uuid NOT NULL,
    category_name varchar NOT NULL,
    order_cnt   integer NOT NULL CHECK (order_cnt >= 0),
    UNIQUE (user_id, category_id)
) WITH (fillfactor = 80);
COMMENT ON TABLE cdm.user_category_counters IS 'Orders per user per dish category: distinct CLOSED orders of the user with at least one dish of the category';
COMMENT ON COLUMN cdm.user_category_counters.id IS 'Surrogate row number';
COMMENT ON COLUMN cdm.user_category_counters.user_id IS 'The user: dds.h_user.h_user_pk';
COMMENT ON COLUMN cdm.user_category_counters.category_id IS 'The category: dds.h_category.h_category_pk';
COMMENT ON COLUMN cdm.user_category_counters.category_name IS 'The category name (its business key)';
COMMENT ON COLUMN cdm.user_category_counters.order_cnt IS 'Number of the user''s CLOSED orders with a dish of the category (several such dishes count once)';

-- Orders per user: what rules over all of a user's orders count (install/
-- 79_tag_refresh.sql).  Its deltas travel with the category mart's (the ingest
-- hands the order trigger's deltas over as six arrays, see
-- dwh.defer_mart_deltas) under two keys that no category has: a category
-- key is a UUID version 5, these are not.
CREATE TABLE cdm.user_order_counters (
    id          bigserial PRIMARY KEY,
    user_id     uuid NOT NULL UNIQUE,
    order_cnt   integer NOT NULL CHECK (order_cnt >= 0)
) WITH (fillfactor = 80);
COMMENT ON TABLE cdm.user_order_counters IS 'Orders per user: distinct CLOSED orders of the user';
COMMENT ON COLUMN cdm.user_order_counters.id IS 'Surrogate row number';
COMMENT ON COLUMN cdm.user_order_counters.user_id IS 'The user: dds.h_user.h_user_pk';
COMMENT ON COLUMN cdm.user_order_counters.order_cnt IS 'Number of the user''s CLOSED orders';

-- In the category deltas: the change of a user's CLOSED order count ...
CREATE FUNCTION dwh.all_orders_key() RETURNS uuid
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT ''00000000-0000-0000-0000-000000000000''::pg_catalog.uuid';
COMMENT ON FUNCTION dwh.all_orders_key() IS
    'Internal: the key that carries a user''s CLOSED order count delta among the category mart deltas (cdm.user_order_counters)';

-- ... and "some order of this user changed" (a positive delta, so that
-- summing the deltas of a batch never cancels it): the tag step locks
-- such users' rows before it refreshes their tags.
CREATE FUNCTION dwh.touched_user_key() RETURNS uuid
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT ''00000000-0000-0000-0000-000000000001''::pg_catalog.uuid';
COMMENT ON FUNCTION dwh.touched_user_key() IS
    'Internal: the key that marks, among the category mart deltas, a user some of whose orders changed (the tag step locks the user)';
