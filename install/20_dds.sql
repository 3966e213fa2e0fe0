-- DDS: Data Vault 2.0.  Keys are dwh.hash_key() UUIDs, so any replay yields
-- the same rows.  Hubs are insert-only.  Links hold the current
-- relationships (a dish that leaves an order, a dish moved to another
-- category replace their link), so that a join over them answers "now"
-- without effectivity satellites.  Satellites are insert-only, one row per
-- change, and their load_dt is the version's source timestamp (the order's
-- update_ts, the dictionary value's update_ts_utc): the current row is the
-- one with the latest load_dt whatever the arrival order.

CREATE TABLE dds.h_user (
    h_user_pk   uuid PRIMARY KEY,
    user_id     varchar NOT NULL UNIQUE,
    load_dt     timestamp NOT NULL,
    load_src    varchar NOT NULL
);
COMMENT ON TABLE dds.h_user IS 'Hub of users';
COMMENT ON COLUMN dds.h_user.h_user_pk IS 'dwh.hash_key(user_id)';
COMMENT ON COLUMN dds.h_user.user_id IS 'User id (business key, the Redis key)';
COMMENT ON COLUMN dds.h_user.load_dt IS 'When the user was first loaded';
COMMENT ON COLUMN dds.h_user.load_src IS 'Table it was first loaded from';

CREATE TABLE dds.h_product (
    h_product_pk uuid PRIMARY KEY,
    product_id  varchar NOT NULL UNIQUE,
    load_dt     timestamp NOT NULL,
    load_src    varchar NOT NULL
);
COMMENT ON TABLE dds.h_product IS 'Hub of dishes';
COMMENT ON COLUMN dds.h_product.h_product_pk IS 'dwh.hash_key(product_id)';
COMMENT ON COLUMN dds.h_product.product_id IS 'Dish id (business key: order_items[].id, menu[]._id)';
COMMENT ON COLUMN dds.h_product.load_dt IS 'When the dish was first loaded';
COMMENT ON COLUMN dds.h_product.load_src IS 'Table it was first loaded from';

CREATE TABLE dds.h_category (
    h_category_pk uuid PRIMARY KEY,
    category_name varchar NOT NULL UNIQUE,
    load_dt     timestamp NOT NULL,
    load_src    varchar NOT NULL
);
COMMENT ON TABLE dds.h_category IS 'Hub of dish categories';
COMMENT ON COLUMN dds.h_category.h_category_pk IS 'dwh.hash_key(category_name)';
COMMENT ON COLUMN dds.h_category.category_name IS 'Category name (business key: categories have no id)';
COMMENT ON COLUMN dds.h_category.load_dt IS 'When the category was first loaded';
COMMENT ON COLUMN dds.h_category.load_src IS 'Table it was first loaded from';

CREATE TABLE dds.h_restaurant (
    h_restaurant_pk uuid PRIMARY KEY,
    restaurant_id varchar NOT NULL UNIQUE,
    load_dt     timestamp NOT NULL,
    load_src    varchar NOT NULL
);
COMMENT ON TABLE dds.h_restaurant IS 'Hub of restaurants';
COMMENT ON COLUMN dds.h_restaurant.h_restaurant_pk IS 'dwh.hash_key(restaurant_id)';
COMMENT ON COLUMN dds.h_restaurant.restaurant_id IS 'Restaurant id (business key, the Redis key)';
COMMENT ON COLUMN dds.h_restaurant.load_dt IS 'When the restaurant was first loaded';
COMMENT ON COLUMN dds.h_restaurant.load_src IS 'Table it was first loaded from';

CREATE TABLE dds.h_order (
    h_order_pk  uuid PRIMARY KEY,
    order_id    bigint NOT NULL UNIQUE,
    order_dt    timestamp NOT NULL,
    load_dt     timestamp NOT NULL,
    load_src    varchar NOT NULL
);
COMMENT ON TABLE dds.h_order IS 'Hub of orders';
COMMENT ON COLUMN dds.h_order.h_order_pk IS 'dwh.hash_key(order_id::text)';
COMMENT ON COLUMN dds.h_order.order_id IS 'Order id (business key: message object_id)';
COMMENT ON COLUMN dds.h_order.order_dt IS 'Order time (payload.date) of the current version';
COMMENT ON COLUMN dds.h_order.load_dt IS 'When the order was first loaded';
COMMENT ON COLUMN dds.h_order.load_src IS 'Table it was first loaded from';

-- The link key is a function of the hub keys, so the pair is the primary
-- key: one index serves uniqueness and the lookups by order.
CREATE TABLE dds.l_order_user (
    hk_order_user_pk uuid NOT NULL,
    h_order_pk  uuid NOT NULL,
    h_user_pk   uuid NOT NULL,
    load_dt     timestamp NOT NULL,
    load_src    varchar NOT NULL,
    PRIMARY KEY (h_order_pk, h_user_pk)
);
COMMENT ON TABLE dds.l_order_user IS 'Link order -> user: who placed the order (current version)';
COMMENT ON COLUMN dds.l_order_user.hk_order_user_pk IS 'dwh.hash_key(h_order_pk, h_user_pk): unique as the primary key (h_order_pk, h_user_pk) is';
COMMENT ON COLUMN dds.l_order_user.h_order_pk IS 'The order';
COMMENT ON COLUMN dds.l_order_user.h_user_pk IS 'The user';
COMMENT ON COLUMN dds.l_order_user.load_dt IS 'When the link was loaded';
COMMENT ON COLUMN dds.l_order_user.load_src IS 'Table it was loaded from';

CREATE TABLE dds.l_order_product (
    hk_order_product_pk uuid NOT NULL,
    h_order_pk  uuid NOT NULL,
    h_product_pk uuid NOT NULL,
    load_dt     timestamp NOT NULL,
    load_src    varchar NOT NULL,
    PRIMARY KEY (h_order_pk, h_product_pk)
);
-- A dish moved to another category recounts the orders holding it.
CREATE INDEX l_order_product_h_product_pk_idx ON dds.l_order_product (h_product_pk);
COMMENT ON TABLE dds.l_order_product IS 'Link order -> dish: the distinct dishes of the order''s current version';
COMMENT ON COLUMN dds.l_order_product.hk_order_product_pk IS 'dwh.hash_key(h_order_pk, h_product_pk): unique as the primary key (h_order_pk, h_product_pk) is';
COMMENT ON COLUMN dds.l_order_product.h_order_pk IS 'The order';
COMMENT ON COLUMN dds.l_order_product.h_product_pk IS 'The dish';
COMMENT ON COLUMN dds.l_order_product.load_dt IS 'When the link was loaded';
COMMENT ON COLUMN dds.l_order_product.load_src IS 'Table it was loaded from';

CREATE TABLE dds.l_product_restaurant (
    hk_product_restaurant_pk uuid PRIMARY KEY,
    h_product_pk uuid NOT NULL REFERENCES dds.h_product,
    h_restaurant_pk uuid NOT NULL REFERENCES dds.h_restaurant,
    load_dt     timestamp NOT NULL,
    load_src    varchar NOT NULL
);
COMMENT ON TABLE dds.l_product_restaurant IS 'Link dish -> restaurant: restaurants that serve (or served) the dish, from menus and orders';
COMMENT ON COLUMN dds.l_product_restaurant.hk_product_restaurant_pk IS 'dwh.hash_key(h_product_pk, h_restaurant_pk)';
COMMENT ON COLUMN dds.l_product_restaurant.h_product_pk IS 'The dish';
COMMENT ON COLUMN dds.l_product_restaurant.h_restaurant_pk IS 'The restaurant';
COMMENT ON COLUMN dds.l_product_restaurant.load_dt IS 'When the link was loaded';
COMMENT ON COLUMN dds.l_product_restaurant.load_src IS 'Table it was loaded from';

CREATE TABLE dds.l_product_category (
    hk_product_category_pk uuid PRIMARY KEY,
    h_product_pk uuid NOT NULL UNIQUE REFERENCES dds.h_product,
    h_category_pk uuid NOT NULL REFERENCES dds.h_category,
    load_dt     timestamp NOT NULL,
    load_src    varchar NOT NULL
);
COMMENT ON TABLE dds.l_product_category IS 'Link dish -> category: the dish''s current category, from the newest menu that names it';
COMMENT ON COLUMN dds.l_product_category.hk_product_category_pk IS 'dwh.hash_key(h_product_pk, h_category_pk)';
COMMENT ON COLUMN dds.l_product_category.h_product_pk IS 'The dish (one current category per dish)';
COMMENT ON COLUMN dds.l_product_category.h_category_pk IS 'Its category';
COMMENT ON COLUMN dds.l_product_category.load_dt IS 'Version of the menu that set it (restaurant update_ts_utc)';
COMMENT ON COLUMN dds.l_product_category.load_src IS 'Table it was loaded from';

CREATE TABLE dds.s_user_names (
    h_user_pk   uuid NOT NULL REFERENCES dds.h_user,
    username    varchar NOT NULL,
    userlogin   varchar NOT NULL,
    hk_user_names_hashdiff uuid NOT NULL,
    load_dt     timestamp NOT NULL,
    load_src    varchar NOT NULL,
    PRIMARY KEY (h_user_pk, load_dt)
);
COMMENT ON TABLE dds.s_user_names IS 'Satellite of users: name and login, one row per change';
COMMENT ON COLUMN dds.s_user_names.h_user_pk IS 'The user';
COMMENT ON COLUMN dds.s_user_names.username IS 'Full name';
COMMENT ON COLUMN dds.s_user_names.userlogin IS 'Login';
COMMENT ON COLUMN dds.s_user_names.hk_user_names_hashdiff IS 'dwh.hash_key(h_user_pk::text || username || userlogin)';
COMMENT ON COLUMN dds.s_user_names.load_dt IS 'Version: the value''s update_ts_utc (-infinity when absent)';
COMMENT ON COLUMN dds.s_user_names.load_src IS 'Table it was loaded from';

CREATE TABLE dds.s_product_names (
    h_product_pk uuid NOT NULL REFERENCES dds.h_product,
    name        varchar NOT NULL,
    hk_product_names_hashdiff uuid NOT NULL,
    load_dt     timestamp NOT NULL,
    load_src    varchar NOT NULL,
    PRIMARY KEY (h_product_pk, load_dt)
);
COMMENT ON TABLE dds.s_product_names IS 'Satellite of dishes: name, one row per change, from menus and orders';
COMMENT ON COLUMN dds.s_product_names.h_product_pk IS 'The dish';
COMMENT ON COLUMN dds.s_product_names.name IS 'Dish name';
COMMENT ON COLUMN dds.s_product_names.hk_product_names_hashdiff IS 'dwh.hash_key(h_product_pk::text || name)';
COMMENT ON COLUMN dds.s_product_names.load_dt IS 'Version: the order''s update_ts or the menu''s update_ts_utc';
COMMENT ON COLUMN dds.s_product_names.load_src IS 'Table it was loaded from';

-- Each dish's one order naming row (dwh.place_order_namings), found by
-- key.
CREATE UNIQUE INDEX s_product_names_order_naming_idx ON dds.s_product_names (h_product_pk)
    WHERE load_src = 'stg.order_events';

-- Where the order naming row of a dish belongs (docs/data-rule.md): its
-- first and newest naming by orders and its newest by menus.  Every batch
-- moves the newest order naming of the dishes it names; here that is an
-- update of columns no index holds, which PostgreSQL makes in the row's
-- page (the room fillfactor leaves) and prunes without a vacuum, while
-- the satellite row it decides stays where it is.  A row exists for each
-- dish that orders named; a batch's claim inserts it empty, at step 2 of
-- the lock order, and fills it at step 6.
CREATE TABLE dds.product_namings (
    h_product_pk    uuid PRIMARY KEY REFERENCES dds.h_product,
    first_order_dt  timestamp,
    last_order_dt   timestamp,
    last_order_name varchar,
    last_menu_dt    timestamp
) WITH (fillfactor = 50);
COMMENT ON TABLE dds.product_namings IS 'Each dish''s first and newest naming by orders and newest by menus: where its order naming row of s_product_names belongs';
COMMENT ON COLUMN dds.product_namings.h_product_pk IS 'The dish';
COMMENT ON COLUMN dds.product_namings.first_order_dt IS 'The oldest update_ts of an order version that names it';
COMMENT ON COLUMN dds.product_namings.last_order_dt IS 'The newest update_ts of an order version that names it';
COMMENT ON COLUMN dds.product_namings.last_order_name IS 'The greatest name (byte-wise) that order versions of last_order_dt give it';
COMMENT ON COLUMN dds.product_namings.last_menu_dt IS 'The newest version time of a menu that names it; null: no menu does';

CREATE TABLE dds.s_restaurant_names (
    h_restaurant_pk uuid NOT NULL REFERENCES dds.h_restaurant,
    name        varchar NOT NULL,
    hk_restaurant_names_hashdiff uuid NOT NULL,
    load_dt     timestamp NOT NULL,
    load_src    varchar NOT NULL,
    PRIMARY KEY (h_restaurant_pk, load_dt)
);
COMMENT ON TABLE dds.s_restaurant_names IS 'Satellite of restaurants: name, one row per change';
COMMENT ON COLUMN dds.s_restaurant_names.h_restaurant_pk IS 'The restaurant';
COMMENT ON COLUMN dds.s_restaurant_names.name IS 'Restaurant name';
COMMENT ON COLUMN dds.s_restaurant_names.hk_restaurant_names_hashdiff IS 'dwh.hash_key(h_restaurant_pk::text || name)';
COMMENT ON COLUMN dds.s_restaurant_names.load_dt IS 'Version: the value''s update_ts_utc (-infinity when absent)';
COMMENT ON COLUMN dds.s_restaurant_names.load_src IS 'Table it was loaded from';

CREATE TABLE dds.s_order_cost (
    h_order_pk  uuid NOT NULL,
    cost        numeric(19, 5) NOT NULL,
    payment     numeric(19, 5) NOT NULL,
    hk_order_cost_hashdiff uuid NOT NULL,
    load_dt     timestamp NOT NULL,
    load_src    varchar NOT NULL,
    PRIMARY KEY (h_order_pk, load_dt)
);
COMMENT ON TABLE dds.s_order_cost IS 'Satellite of orders: cost and payment, one row per change';
COMMENT ON COLUMN dds.s_order_cost.h_order_pk IS 'The order';
COMMENT ON COLUMN dds.s_order_cost.cost IS 'payload.cost: sum of price x quantity';
COMMENT ON COLUMN dds.s_order_cost.payment IS 'payload.payment: what the user paid';
COMMENT ON COLUMN dds.s_order_cost.hk_order_cost_hashdiff IS 'dwh.hash_key(h_order_pk::text || cost::text || payment::text)';
COMMENT ON COLUMN dds.s_order_cost.load_dt IS 'Version: the order''s update_ts';
COMMENT ON COLUMN dds.s_order_cost.load_src IS 'Table it was loaded from';

CREATE TABLE dds.s_order_status (
    h_order_pk  uuid NOT NULL,
    status      varchar NOT NULL,
    hk_order_status_hashdiff uuid NOT NULL,
    load_dt     timestamp NOT NULL,
    load_src    varchar NOT NULL,
    PRIMARY KEY (h_order_pk, load_dt)
);
COMMENT ON TABLE dds.s_order_status IS 'Satellite of orders: final status, one row per change; the latest row is the one that counts';
COMMENT ON COLUMN dds.s_order_status.h_order_pk IS 'The order';
COMMENT ON COLUMN dds.s_order_status.status IS 'payload.final_status: only CLOSED orders are counted in the marts';
COMMENT ON COLUMN dds.s_order_status.hk_order_status_hashdiff IS 'dwh.hash_key(h_order_pk::text || status)';
COMMENT ON COLUMN dds.s_order_status.load_dt IS 'Version: the order''s update_ts';
COMMENT ON COLUMN dds.s_order_status.load_src IS 'Table it was loaded from';

-- References of the order tables, checked once per statement.  The links
-- and satellites of orders take about ten rows per order; as foreign keys,
-- each row ran a query of its own and locked its hub rows (about a third
-- of the CPU of a batch).  They refuse the same rows set-based instead:
-- after each INSERT, each distinct key of the statement's new rows is
-- looked up in its hub (SQLSTATE 23503, as a foreign key would say;
-- src/dwh_references.c).  No row lock is needed to keep the check true
-- until commit, because hub rows are never deleted and their keys never
-- change (refused below); a TRUNCATE of a hub must take the tables that
-- refer to it along.  Updates of the reference columns are refused: dwh
-- replaces a link, it never repoints it.
CREATE FUNCTION dwh.order_references_exist() RETURNS trigger
    AS 'MODULE_PATHNAME', 'dwh_order_references_exist'
    LANGUAGE C;
COMMENT ON FUNCTION dwh.order_references_exist() IS
    'AFTER INSERT statement trigger of the order links and satellites: every row''s hubs exist (23503 otherwise)';

CREATE FUNCTION dwh.order_references_kept() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'rows of dds.% cannot be deleted', TG_TABLE_NAME
            USING ERRCODE = '23503',
                  DETAIL = 'Links and satellites refer to hub rows, which DDS never deletes.',
                  HINT = 'DDS is derived from STG: SELECT * FROM dwh.rebuild(vault => true) recomputes it.';
    ELSIF TG_OP = 'UPDATE' THEN
        RAISE EXCEPTION 'key columns of dds.% cannot be updated', TG_TABLE_NAME
            USING ERRCODE = '23503',
                  DETAIL = 'Hub keys are fixed, and a link is replaced, never repointed.',
                  HINT = 'DDS is derived from STG: SELECT * FROM dwh.rebuild(vault => true) recomputes it.';
    END IF;
    -- TRUNCATE: the tables that refer to the hub must be empty now (taken
    -- along in the same command).
    IF (TG_TABLE_NAME = 'h_order'
        AND (EXISTS (SELECT FROM dds.l_order_user) OR EXISTS (SELECT FROM dds.l_order_product)
             OR EXISTS (SELECT FROM dds.s_order_status) OR EXISTS (SELECT FROM dds.s_order_cost)))
       OR (TG_TABLE_NAME = 'h_user' AND EXISTS (SELECT FROM dds.l_order_user))
       OR (TG_TABLE_NAME = 'h_product' AND EXISTS (SELECT FROM dds.l_order_product)) THEN
        RAISE EXCEPTION 'cannot truncate dds.% while rows refer to it', TG_TABLE_NAME
            USING ERRCODE = '23503',
                  DETAIL = 'Order links and satellites refer to its rows.',
                  HINT = 'Truncate the tables that refer to it in the same command, or run SELECT * FROM dwh.rebuild(vault => true).';
    END IF;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION dwh.order_references_kept() IS
    'Trigger of the hubs of orders, users and dishes and of the order links and satellites: refuses what would leave a reference dangling';

CREATE TRIGGER references_exist AFTER INSERT ON dds.l_order_user
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_exist();
CREATE TRIGGER references_exist AFTER INSERT ON dds.l_order_product
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_exist();
CREATE TRIGGER references_exist AFTER INSERT ON dds.s_order_status
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_exist();
CREATE TRIGGER references_exist AFTER INSERT ON dds.s_order_cost
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_exist();

CREATE TRIGGER references_kept BEFORE UPDATE OF h_order_pk, h_user_pk ON dds.l_order_user
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
CREATE TRIGGER references_kept BEFORE UPDATE OF h_order_pk, h_product_pk ON dds.l_order_product
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
CREATE TRIGGER references_kept BEFORE UPDATE OF h_order_pk ON dds.s_order_status
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
CREATE TRIGGER references_kept BEFORE UPDATE OF h_order_pk ON dds.s_order_cost
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
CREATE TRIGGER references_kept BEFORE DELETE OR UPDATE OF h_order_pk ON dds.h_order
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
CREATE TRIGGER references_kept BEFORE DELETE OR UPDATE OF h_user_pk ON dds.h_user
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
CREATE TRIGGER references_kept BEFORE DELETE OR UPDATE OF h_product_pk ON dds.h_product
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
CREATE TRIGGER references_truncated AFTER TRUNCATE ON dds.h_order
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
CREATE TRIGGER references_truncated AFTER TRUNCATE ON dds.h_user
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
CREATE TRIGGER references_truncated AFTER TRUNCATE ON dds.h_product
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_references_kept();
