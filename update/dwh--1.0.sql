-- dwh install script, assembled by the Makefile from install/*.sql in order.

\echo Use "CREATE EXTENSION dwh" to load this file. \quit

DO $$
BEGIN
    IF pg_catalog.getdatabaseencoding() <> 'UTF8' THEN
        RAISE EXCEPTION 'dwh requires a database with UTF8 encoding, not %',
            pg_catalog.getdatabaseencoding()
            USING ERRCODE = '22023',
                  HINT = 'Create the database with ENCODING ''UTF8'' and install dwh there.';
    END IF;
END
$$;

CREATE SCHEMA stg;
CREATE SCHEMA dds;
CREATE SCHEMA cdm;

COMMENT ON SCHEMA stg IS 'dwh raw layer: data as it arrived from Kafka and Redis, one row per key, latest version';
COMMENT ON SCHEMA dds IS 'dwh Data Vault 2.0: hubs, links and satellites, maintained by triggers on stg';
COMMENT ON SCHEMA cdm IS 'dwh counter marts read by analysts and BI tools';
COMMENT ON SCHEMA dwh IS 'dwh operations: ingest functions, dead letters, verify and rebuild';

-- Vault keys: name-based UUID v5 (RFC 4122) in the namespace of the
-- services dwh replaces, 7f288a2e-0ad0-4039-8e59-6c9838d87307.
CREATE FUNCTION dwh.uuid_v5(namespace uuid, name text) RETURNS uuid
    AS 'MODULE_PATHNAME', 'dwh_uuid_v5_sql'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION dwh.uuid_v5(uuid, text) IS
    'Name-based UUID version 5 (SHA-1) of name in namespace';

CREATE FUNCTION dwh.hash_key(business_key text) RETURNS uuid
    AS 'MODULE_PATHNAME', 'dwh_hash_key_text'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION dwh.hash_key(text) IS
    'Hub key or hashdiff: UUID v5 of the text in the dwh namespace';

CREATE FUNCTION dwh.hash_key(first_key uuid, second_key uuid) RETURNS uuid
    AS 'MODULE_PATHNAME', 'dwh_hash_key_link'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION dwh.hash_key(uuid, uuid) IS
    'Link key: UUID v5 of both hub keys written one after the other (lower-case, hyphenated)';

-- Every writer of order and dictionary data takes this advisory lock: order
-- batches in shared mode, changes of dish categories and names in exclusive
-- mode, so that a mart row is never computed from a dictionary state that
-- a concurrent transaction is changing.
CREATE FUNCTION dwh.dictionary_lock_key() RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT 7238964021746305793::bigint';
COMMENT ON FUNCTION dwh.dictionary_lock_key() IS
    'Advisory lock key serialising dish category and name changes against order batches';
-- STG: data as it arrived.  One row per key holding its latest version; the
-- BEFORE trigger dwh.stg_guard validates each row, derives update_ts and
-- skips any update that does not carry a newer version.

CREATE FUNCTION dwh.stg_guard() RETURNS trigger
    AS 'MODULE_PATHNAME', 'dwh_stg_guard'
    LANGUAGE C;
COMMENT ON FUNCTION dwh.stg_guard() IS
    'BEFORE ROW trigger of stg tables: validates the payload, derives update_ts, keeps the newest version';

CREATE TABLE stg.order_events (
    id          bigserial PRIMARY KEY,
    object_id   bigint NOT NULL UNIQUE,
    object_type varchar NOT NULL CHECK (object_type = 'order'),
    sent_dttm   timestamp NOT NULL,
    payload     jsonb NOT NULL,
    update_ts   timestamp NOT NULL,
    loaded_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE stg.order_events IS 'Orders from Kafka topic order-service_orders: one row per order, its latest version';
COMMENT ON COLUMN stg.order_events.id IS 'Surrogate row number';
COMMENT ON COLUMN stg.order_events.object_id IS 'Order id (message object_id), the idempotency key of the stream';
COMMENT ON COLUMN stg.order_events.object_type IS 'Message object_type; always ''order'' here (other types go to stg.other_events)';
COMMENT ON COLUMN stg.order_events.sent_dttm IS 'When the message was sent (UTC)';
COMMENT ON COLUMN stg.order_events.payload IS 'The message''s payload object, as is';
COMMENT ON COLUMN stg.order_events.update_ts IS 'Version of the order: payload.update_ts; an older version never replaces a newer one';
COMMENT ON COLUMN stg.order_events.loaded_at IS 'When this version was stored';

CREATE TRIGGER order_events_guard
    BEFORE INSERT OR UPDATE ON stg.order_events
    FOR EACH ROW EXECUTE FUNCTION dwh.stg_guard('order');

CREATE TABLE stg.other_events (
    id              bigserial PRIMARY KEY,
    object_id       bigint,
    object_type     varchar NOT NULL,
    sent_dttm       timestamp,
    message         jsonb NOT NULL,
    topic           text,
    kafka_partition integer,
    kafka_offset    bigint,
    received_at     timestamptz NOT NULL DEFAULT now()
);
-- A message replayed from Kafka (dwh.kafka_seek) is kept once.
CREATE UNIQUE INDEX other_events_kafka_position_idx
    ON stg.other_events (topic, kafka_partition, kafka_offset)
    WHERE kafka_offset IS NOT NULL;
COMMENT ON TABLE stg.other_events IS 'Valid messages of an object_type other than ''order'': kept whole, out of the counts';
COMMENT ON COLUMN stg.other_events.id IS 'Surrogate row number';
COMMENT ON COLUMN stg.other_events.object_id IS 'Message object_id when it is an integer';
COMMENT ON COLUMN stg.other_events.object_type IS 'Message object_type';
COMMENT ON COLUMN stg.other_events.sent_dttm IS 'Message sent_dttm when it is a valid timestamp';
COMMENT ON COLUMN stg.other_events.message IS 'The whole message';
COMMENT ON COLUMN stg.other_events.topic IS 'Kafka topic it came from, when known';
COMMENT ON COLUMN stg.other_events.kafka_partition IS 'Kafka partition it came from, when known';
COMMENT ON COLUMN stg.other_events.kafka_offset IS 'Kafka offset it came from, when known';
COMMENT ON COLUMN stg.other_events.received_at IS 'When it was stored';

CREATE TABLE stg.users (
    id          bigserial PRIMARY KEY,
    object_id   varchar NOT NULL UNIQUE,
    payload     jsonb NOT NULL,
    update_ts   timestamp,
    loaded_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE stg.users IS 'Users mirrored from Redis: one row per key, its latest value';
COMMENT ON COLUMN stg.users.id IS 'Surrogate row number';
COMMENT ON COLUMN stg.users.object_id IS 'Redis key: the user id';
COMMENT ON COLUMN stg.users.payload IS 'The Redis value, as is: {"_id", "name", "login", "update_ts_utc"}';
COMMENT ON COLUMN stg.users.update_ts IS 'Version of the value: payload.update_ts_utc (null when absent)';
COMMENT ON COLUMN stg.users.loaded_at IS 'When this version was stored';

CREATE TRIGGER users_guard
    BEFORE INSERT OR UPDATE ON stg.users
    FOR EACH ROW EXECUTE FUNCTION dwh.stg_guard('user');

CREATE TABLE stg.restaurants (
    id          bigserial PRIMARY KEY,
    object_id   varchar NOT NULL UNIQUE,
    payload     jsonb NOT NULL,
    update_ts   timestamp,
    loaded_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE stg.restaurants IS 'Restaurants and their menus mirrored from Redis: one row per key, its latest value';
COMMENT ON COLUMN stg.restaurants.id IS 'Surrogate row number';
COMMENT ON COLUMN stg.restaurants.object_id IS 'Redis key: the restaurant id';
COMMENT ON COLUMN stg.restaurants.payload IS 'The Redis value, as is: {"_id", "name", "menu": [{"_id", "name", "price", "category"}], "update_ts_utc"}';
COMMENT ON COLUMN stg.restaurants.update_ts IS 'Version of the value: payload.update_ts_utc (null when absent)';
COMMENT ON COLUMN stg.restaurants.loaded_at IS 'When this version was stored';

CREATE TRIGGER restaurants_guard
    BEFORE INSERT OR UPDATE ON stg.restaurants
    FOR EACH ROW EXECUTE FUNCTION dwh.stg_guard('restaurant');
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
    h_order_pk  uuid NOT NULL REFERENCES dds.h_order,
    h_user_pk   uuid NOT NULL REFERENCES dds.h_user,
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
    h_order_pk  uuid NOT NULL REFERENCES dds.h_order,
    h_product_pk uuid NOT NULL REFERENCES dds.h_product,
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
COMMENT ON COLUMN dds.s_user_names.load_dt IS 'Version: the value''s update_ts_utc (load time when absent)';
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
COMMENT ON COLUMN dds.s_restaurant_names.load_dt IS 'Version: the value''s update_ts_utc (load time when absent)';
COMMENT ON COLUMN dds.s_restaurant_names.load_src IS 'Table it was loaded from';

CREATE TABLE dds.s_order_cost (
    h_order_pk  uuid NOT NULL REFERENCES dds.h_order,
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
    h_order_pk  uuid NOT NULL REFERENCES dds.h_order,
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
-- Dishes are named by orders and by menus.  Both paths load them here, so
-- that "the latest name" means the same thing whoever wrote it: the name of
-- the newest version (order update_ts or menu update_ts_utc), ties broken by
-- the greater name.

CREATE FUNCTION dwh.load_products(keys uuid[], ids text[], names text[],
                                  versions timestamp[], source text)
    RETURNS uuid[]
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    renamed uuid[];
BEGIN
    WITH candidate AS MATERIALIZED (
        SELECT DISTINCT ON (c.h_product_pk)
               c.h_product_pk, c.product_id, c.name, c.load_dt,
               dwh.hash_key(c.h_product_pk::text || c.name) AS hashdiff
        FROM unnest(keys, ids, names, versions) AS c(h_product_pk, product_id, name, load_dt)
        ORDER BY c.h_product_pk, c.load_dt DESC, c.name DESC
    ),
    hub AS (
        INSERT INTO dds.h_product (h_product_pk, product_id, load_dt, load_src)
        SELECT h_product_pk, product_id, now(), source
        FROM candidate
        ORDER BY h_product_pk
        ON CONFLICT DO NOTHING
    ),
    state AS MATERIALIZED (
        SELECT c.*, cur.name AS cur_name, cur.load_dt AS cur_load_dt,
               (SELECT p.hk_product_names_hashdiff
                FROM dds.s_product_names p
                WHERE p.h_product_pk = c.h_product_pk AND p.load_dt <= c.load_dt
                ORDER BY p.load_dt DESC LIMIT 1) AS prev_hashdiff
        FROM candidate c
        LEFT JOIN LATERAL (
            SELECT s.name, s.load_dt
            FROM dds.s_product_names s
            WHERE s.h_product_pk = c.h_product_pk
            ORDER BY s.load_dt DESC LIMIT 1) cur ON true
    ),
    satellite AS (
        INSERT INTO dds.s_product_names AS s
               (h_product_pk, name, hk_product_names_hashdiff, load_dt, load_src)
        SELECT h_product_pk, name, hashdiff, load_dt, source
        FROM state
        WHERE prev_hashdiff IS DISTINCT FROM hashdiff
        ORDER BY h_product_pk
        ON CONFLICT (h_product_pk, load_dt) DO UPDATE
        SET name = EXCLUDED.name,
            hk_product_names_hashdiff = EXCLUDED.hk_product_names_hashdiff,
            load_src = EXCLUDED.load_src
        WHERE EXCLUDED.name > s.name
    )
    SELECT array_agg(h_product_pk) INTO renamed
    FROM state
    WHERE cur_name IS NOT NULL AND name <> cur_name
      AND (load_dt > cur_load_dt OR (load_dt = cur_load_dt AND name > cur_name));

    RETURN renamed;
END
$fn$;
COMMENT ON FUNCTION dwh.load_products(uuid[], text[], text[], timestamp[], text) IS
    'Load dish hubs and name satellites; returns the dishes whose current name changed';

-- Mart rows carry the dish name: follow a rename on every row of the dish.
CREATE FUNCTION dwh.refresh_product_names(products uuid[]) RETURNS void
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
    UPDATE cdm.user_product_counters m
    SET product_name = n.name
    FROM (SELECT DISTINCT ON (h_product_pk) h_product_pk, name
          FROM dds.s_product_names
          WHERE h_product_pk = ANY (products)
          ORDER BY h_product_pk, load_dt DESC) n
    WHERE m.product_id = n.h_product_pk
      AND m.product_name IS DISTINCT FROM n.name;
$fn$;
COMMENT ON FUNCTION dwh.refresh_product_names(uuid[]) IS
    'Set product_name of every mart row of these dishes to their current name';

-- Apply per-key count deltas to the marts.  Rows are written in key order
-- so that concurrent batches never deadlock; when some counts go down, the
-- existing rows are first locked in that order, because an UPDATE does not
-- promise one.  A row lives while its count is positive.  (CHECK constraints
-- are evaluated on the row an INSERT proposes before ON CONFLICT, so
-- decrements cannot go through the upsert.)
CREATE FUNCTION dwh.apply_mart_deltas(product_users uuid[], products uuid[],
                                      product_deltas integer[],
                                      category_users uuid[], categories uuid[],
                                      category_deltas integer[])
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    zero_users uuid[];
    zero_keys uuid[];
BEGIN
    IF products IS NOT NULL THEN
        IF EXISTS (SELECT FROM unnest(product_deltas) d WHERE d < 0) THEN
            PERFORM FROM cdm.user_product_counters m
            JOIN unnest(product_users, products) AS k(user_id, product_id)
              ON m.user_id = k.user_id AND m.product_id = k.product_id
            ORDER BY m.user_id, m.product_id
            FOR UPDATE OF m;
        END IF;

        WITH delta AS MATERIALIZED (
            SELECT * FROM unnest(product_users, products, product_deltas)
                     AS d(user_id, product_id, d)
        ),
        name AS MATERIALIZED (
            SELECT p.product_id,
                   (SELECT s.name FROM dds.s_product_names s
                    WHERE s.h_product_pk = p.product_id
                    ORDER BY s.load_dt DESC LIMIT 1) AS name
            FROM (SELECT DISTINCT product_id FROM delta WHERE d > 0) p
        ),
        up AS (
            INSERT INTO cdm.user_product_counters AS m
                   (user_id, product_id, product_name, order_cnt)
            SELECT d.user_id, d.product_id, coalesce(n.name, ''), d.d
            FROM delta d JOIN name n USING (product_id)
            WHERE d.d > 0
            ORDER BY d.user_id, d.product_id
            ON CONFLICT (user_id, product_id) DO UPDATE
            SET order_cnt = m.order_cnt + EXCLUDED.order_cnt
        ),
        down AS (
            UPDATE cdm.user_product_counters m
            SET order_cnt = m.order_cnt + d.d
            FROM delta d
            WHERE d.d < 0 AND m.user_id = d.user_id AND m.product_id = d.product_id
            RETURNING m.user_id, m.product_id, m.order_cnt
        )
        SELECT array_agg(user_id), array_agg(product_id)
        INTO zero_users, zero_keys
        FROM down
        WHERE order_cnt = 0;

        IF zero_keys IS NOT NULL THEN
            DELETE FROM cdm.user_product_counters m
            USING unnest(zero_users, zero_keys) AS z(user_id, product_id)
            WHERE m.user_id = z.user_id AND m.product_id = z.product_id
              AND m.order_cnt = 0;
        END IF;
    END IF;

    IF categories IS NOT NULL THEN
        IF EXISTS (SELECT FROM unnest(category_deltas) d WHERE d < 0) THEN
            PERFORM FROM cdm.user_category_counters m
            JOIN unnest(category_users, categories) AS k(user_id, category_id)
              ON m.user_id = k.user_id AND m.category_id = k.category_id
            ORDER BY m.user_id, m.category_id
            FOR UPDATE OF m;
        END IF;

        WITH delta AS MATERIALIZED (
            SELECT * FROM unnest(category_users, categories, category_deltas)
                     AS d(user_id, category_id, d)
        ),
        up AS (
            INSERT INTO cdm.user_category_counters AS m
                   (user_id, category_id, category_name, order_cnt)
            SELECT d.user_id, d.category_id, h.category_name, d.d
            FROM delta d JOIN dds.h_category h ON h.h_category_pk = d.category_id
            WHERE d.d > 0
            ORDER BY d.user_id, d.category_id
            ON CONFLICT (user_id, category_id) DO UPDATE
            SET order_cnt = m.order_cnt + EXCLUDED.order_cnt
        ),
        down AS (
            UPDATE cdm.user_category_counters m
            SET order_cnt = m.order_cnt + d.d
            FROM delta d
            WHERE d.d < 0 AND m.user_id = d.user_id AND m.category_id = d.category_id
            RETURNING m.user_id, m.category_id, m.order_cnt
        )
        SELECT array_agg(user_id), array_agg(category_id)
        INTO zero_users, zero_keys
        FROM down
        WHERE order_cnt = 0;

        IF zero_keys IS NOT NULL THEN
            DELETE FROM cdm.user_category_counters m
            USING unnest(zero_users, zero_keys) AS z(user_id, category_id)
            WHERE m.user_id = z.user_id AND m.category_id = z.category_id
              AND m.order_cnt = 0;
        END IF;
    END IF;
END
$fn$;
COMMENT ON FUNCTION dwh.apply_mart_deltas(uuid[], uuid[], integer[], uuid[], uuid[], integer[]) IS
    'Add per-key order count deltas to the marts, in key order; rows reaching zero are deleted';
-- Orders: every statement that writes stg.order_events carries its rows on
-- to DDS and the marts.  The mart delta of a batch is (what its orders count
-- now) minus (what they counted before), both computed set-based from the
-- batch and from DDS before it changes; no user is ever recounted whole.

CREATE FUNCTION dwh.order_events_changed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    renamed uuid[];
    product_users uuid[];
    products uuid[];
    product_deltas integer[];
    category_users uuid[];
    categories uuid[];
    category_deltas integer[];
    known boolean;
BEGIN
    IF NOT EXISTS (SELECT FROM changed) THEN
        RETURN NULL;
    END IF;

    -- Does DDS hold any of these orders already?  Not for new orders (the
    -- usual case), which take a shorter path below.  (A restore replays
    -- orders DDS already holds.)
    known := TG_OP = 'UPDATE' OR EXISTS (
        SELECT FROM changed c JOIN dds.h_order h ON h.order_id = c.object_id);

    -- Dish categories and names stay put until commit.
    PERFORM pg_advisory_xact_lock_shared(dwh.dictionary_lock_key());

    -- Dishes first (hub order is the same in every transaction: dishes,
    -- orders, users, restaurants; keys sorted within each).
    SELECT dwh.load_products(array_agg(dwh.hash_key(d.id)), array_agg(d.id),
                             array_agg(d.name), array_agg(d.update_ts),
                             'stg.order_events')
    INTO renamed
    FROM (SELECT DISTINCT ON (n.id COLLATE "C") n.id, n.name, n.update_ts
          -- Each name of a dish with its newest version first, by hashing:
          -- a batch names each dish many times, almost always alike, and
          -- sorting all its items cost more than the rest of this step.
          FROM (SELECT e->>'id' AS id, e->>'name' AS name, max(c.update_ts) AS update_ts
                FROM changed c, jsonb_array_elements(c.payload->'order_items') e
                GROUP BY 1, 2) n
          -- Grouping needs no linguistic order: "C" spares strcoll.
          ORDER BY n.id COLLATE "C", n.update_ts DESC, n.name DESC) d;

    IF NOT known THEN
        -- Orders new to DDS: nothing counted before.  No other transaction
        -- can write their rows (it would first conflict on
        -- stg.order_events.object_id), so their hub, links and satellites
        -- are plain INSERTs: no arbiter probes, no speculative insertions.
        -- Rows go in hub key order: the random UUID keys then fill index
        -- pages one after the other, and so do the foreign-key checks.
        WITH batch AS MATERIALIZED (
            SELECT c.object_id,
                   dwh.hash_key(c.object_id::text) AS h_order_pk,
                   c.update_ts,
                   (c.payload->>'date')::timestamp AS order_dt,
                   c.payload->>'final_status' AS status,
                   (c.payload->>'cost')::numeric(19, 5) AS cost,
                   (c.payload->>'payment')::numeric(19, 5) AS payment,
                   c.payload->'user'->>'id' AS user_id,
                   dwh.hash_key(c.payload->'user'->>'id') AS h_user_pk,
                   c.payload->'restaurant'->>'id' AS restaurant_id,
                   dwh.hash_key(c.payload->'restaurant'->>'id') AS h_restaurant_pk,
                   c.payload->'order_items' AS items
            FROM changed c
            ORDER BY h_order_pk
        ),
        item AS MATERIALIZED (
            SELECT DISTINCT b.h_order_pk, b.h_product_pk, b.h_user_pk,
                   b.h_restaurant_pk, b.status
            FROM (SELECT b.*, dwh.hash_key(e->>'id') AS h_product_pk
                  FROM batch b, jsonb_array_elements(b.items) e) b
            ORDER BY b.h_order_pk, b.h_product_pk
        ),
        category AS MATERIALIZED (
            SELECT l.h_product_pk, l.h_category_pk
            FROM dds.l_product_category l
            WHERE l.h_product_pk IN (SELECT h_product_pk FROM item)
        ),
        order_hub AS (
            INSERT INTO dds.h_order (h_order_pk, order_id, order_dt, load_dt, load_src)
            SELECT h_order_pk, object_id, order_dt, now(), 'stg.order_events'
            FROM batch
        ),
        user_hub AS (
            INSERT INTO dds.h_user (h_user_pk, user_id, load_dt, load_src)
            SELECT DISTINCT h_user_pk, user_id, now(), 'stg.order_events'
            FROM batch
            ORDER BY h_user_pk
            ON CONFLICT DO NOTHING
        ),
        restaurant_hub AS (
            INSERT INTO dds.h_restaurant (h_restaurant_pk, restaurant_id, load_dt, load_src)
            SELECT DISTINCT h_restaurant_pk, restaurant_id, now(), 'stg.order_events'
            FROM batch
            ORDER BY h_restaurant_pk
            ON CONFLICT DO NOTHING
        ),
        order_user_link AS (
            INSERT INTO dds.l_order_user (hk_order_user_pk, h_order_pk, h_user_pk, load_dt, load_src)
            SELECT dwh.hash_key(h_order_pk, h_user_pk), h_order_pk, h_user_pk, now(), 'stg.order_events'
            FROM batch
        ),
        order_product_link AS (
            INSERT INTO dds.l_order_product (hk_order_product_pk, h_order_pk, h_product_pk, load_dt, load_src)
            SELECT dwh.hash_key(h_order_pk, h_product_pk), h_order_pk, h_product_pk, now(), 'stg.order_events'
            FROM item
        ),
        product_restaurant_link AS (
            INSERT INTO dds.l_product_restaurant
                   (hk_product_restaurant_pk, h_product_pk, h_restaurant_pk, load_dt, load_src)
            SELECT dwh.hash_key(h_product_pk, h_restaurant_pk), h_product_pk,
                   h_restaurant_pk, now(), 'stg.order_events'
            FROM (SELECT DISTINCT h_product_pk, h_restaurant_pk FROM item) i
            ORDER BY 1
            ON CONFLICT DO NOTHING
        ),
        status_satellite AS (
            INSERT INTO dds.s_order_status
                   (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
            SELECT h_order_pk, status, dwh.hash_key(h_order_pk::text || status),
                   update_ts, 'stg.order_events'
            FROM batch
        ),
        cost_satellite AS (
            INSERT INTO dds.s_order_cost
                   (h_order_pk, cost, payment, hk_order_cost_hashdiff, load_dt, load_src)
            SELECT h_order_pk, cost, payment,
                   dwh.hash_key(h_order_pk::text || cost::text || payment::text),
                   update_ts, 'stg.order_events'
            FROM batch
        ),
        -- In no particular order: dwh.apply_mart_deltas writes in key order.
        product_delta_keys AS (
            SELECT array_agg(h_user_pk) AS users,
                   array_agg(h_product_pk) AS keys,
                   array_agg(d) AS deltas
            FROM (SELECT h_user_pk, h_product_pk, count(*)::integer AS d
                  FROM item WHERE status = 'CLOSED'
                  GROUP BY h_user_pk, h_product_pk) x
        ),
        category_delta_keys AS (
            SELECT array_agg(h_user_pk) AS users,
                   array_agg(h_category_pk) AS keys,
                   array_agg(d) AS deltas
            FROM (SELECT i.h_user_pk, c.h_category_pk,
                         count(DISTINCT i.h_order_pk)::integer AS d
                  FROM item i JOIN category c USING (h_product_pk)
                  WHERE i.status = 'CLOSED'
                  GROUP BY i.h_user_pk, c.h_category_pk) x
        )
        SELECT p.users, p.keys, p.deltas, c.users, c.keys, c.deltas
        INTO product_users, products, product_deltas,
             category_users, categories, category_deltas
        FROM product_delta_keys p, category_delta_keys c;
    ELSE
        WITH batch AS MATERIALIZED (
            SELECT c.object_id,
                   dwh.hash_key(c.object_id::text) AS h_order_pk,
                   c.update_ts,
                   (c.payload->>'date')::timestamp AS order_dt,
                   c.payload->>'final_status' AS status,
                   (c.payload->>'cost')::numeric(19, 5) AS cost,
                   (c.payload->>'payment')::numeric(19, 5) AS payment,
                   c.payload->'user'->>'id' AS user_id,
                   dwh.hash_key(c.payload->'user'->>'id') AS h_user_pk,
                   c.payload->'restaurant'->>'id' AS restaurant_id,
                   dwh.hash_key(c.payload->'restaurant'->>'id') AS h_restaurant_pk,
                   c.payload->'order_items' AS items
            FROM changed c
        ),
        item AS MATERIALIZED (
            SELECT DISTINCT b.h_order_pk, b.h_user_pk, b.h_restaurant_pk, b.status,
                   dwh.hash_key(e->>'id') AS h_product_pk
            FROM batch b, jsonb_array_elements(b.items) e
        ),
        -- What the batch's orders counted before this statement.
        old_user AS MATERIALIZED (
            SELECT l.h_order_pk, l.h_user_pk
            FROM batch b JOIN dds.l_order_user l ON l.h_order_pk = b.h_order_pk
        ),
        old_item AS MATERIALIZED (
            SELECT l.h_order_pk, l.h_product_pk
            FROM batch b JOIN dds.l_order_product l ON l.h_order_pk = b.h_order_pk
        ),
        old_closed AS MATERIALIZED (
            SELECT b.h_order_pk
            FROM batch b
            WHERE (SELECT s.status FROM dds.s_order_status s
                   WHERE s.h_order_pk = b.h_order_pk
                   ORDER BY s.load_dt DESC LIMIT 1) = 'CLOSED'
        ),
        old_counted AS MATERIALIZED (
            SELECT c.h_order_pk, u.h_user_pk, i.h_product_pk
            FROM old_closed c
            JOIN old_user u USING (h_order_pk)
            JOIN old_item i USING (h_order_pk)
        ),
        category AS MATERIALIZED (
            SELECT l.h_product_pk, l.h_category_pk
            FROM dds.l_product_category l
            WHERE l.h_product_pk IN (SELECT h_product_pk FROM item
                                     UNION SELECT h_product_pk FROM old_counted)
        ),
        product_delta AS (
            SELECT h_user_pk, h_product_pk, sum(d)::integer AS d
            FROM (SELECT h_user_pk, h_product_pk, 1 AS d FROM item WHERE status = 'CLOSED'
                  UNION ALL
                  SELECT h_user_pk, h_product_pk, -1 FROM old_counted) x
            GROUP BY h_user_pk, h_product_pk
            HAVING sum(d) <> 0
        ),
        category_delta AS (
            SELECT h_user_pk, h_category_pk, sum(d)::integer AS d
            FROM (SELECT DISTINCT i.h_order_pk, i.h_user_pk, c.h_category_pk, 1 AS d
                  FROM item i JOIN category c USING (h_product_pk)
                  WHERE i.status = 'CLOSED'
                  UNION ALL
                  SELECT DISTINCT o.h_order_pk, o.h_user_pk, c.h_category_pk, -1
                  FROM old_counted o JOIN category c USING (h_product_pk)) x
            GROUP BY h_user_pk, h_category_pk
            HAVING sum(d) <> 0
        ),
        -- Hubs, links and satellites.
        order_hub AS (
            INSERT INTO dds.h_order AS h (h_order_pk, order_id, order_dt, load_dt, load_src)
            SELECT h_order_pk, object_id, order_dt, now(), 'stg.order_events'
            FROM batch
            ORDER BY h_order_pk
            ON CONFLICT (h_order_pk) DO UPDATE SET order_dt = EXCLUDED.order_dt
            WHERE h.order_dt IS DISTINCT FROM EXCLUDED.order_dt
        ),
        user_hub AS (
            INSERT INTO dds.h_user (h_user_pk, user_id, load_dt, load_src)
            SELECT DISTINCT h_user_pk, user_id, now(), 'stg.order_events'
            FROM batch
            ORDER BY h_user_pk
            ON CONFLICT DO NOTHING
        ),
        restaurant_hub AS (
            INSERT INTO dds.h_restaurant (h_restaurant_pk, restaurant_id, load_dt, load_src)
            SELECT DISTINCT h_restaurant_pk, restaurant_id, now(), 'stg.order_events'
            FROM batch
            ORDER BY h_restaurant_pk
            ON CONFLICT DO NOTHING
        ),
        order_user_link AS (
            INSERT INTO dds.l_order_user (hk_order_user_pk, h_order_pk, h_user_pk, load_dt, load_src)
            SELECT dwh.hash_key(h_order_pk, h_user_pk), h_order_pk, h_user_pk, now(), 'stg.order_events'
            FROM batch
            ON CONFLICT DO NOTHING
        ),
        order_product_link AS (
            INSERT INTO dds.l_order_product (hk_order_product_pk, h_order_pk, h_product_pk, load_dt, load_src)
            SELECT dwh.hash_key(h_order_pk, h_product_pk), h_order_pk, h_product_pk, now(), 'stg.order_events'
            FROM item
            ON CONFLICT DO NOTHING
        ),
        product_restaurant_link AS (
            INSERT INTO dds.l_product_restaurant
                   (hk_product_restaurant_pk, h_product_pk, h_restaurant_pk, load_dt, load_src)
            SELECT dwh.hash_key(h_product_pk, h_restaurant_pk), h_product_pk,
                   h_restaurant_pk, now(), 'stg.order_events'
            FROM (SELECT DISTINCT h_product_pk, h_restaurant_pk FROM item) i
            ORDER BY 1
            ON CONFLICT DO NOTHING
        ),
        status_satellite AS (
            INSERT INTO dds.s_order_status AS s
                   (h_order_pk, status, hk_order_status_hashdiff, load_dt, load_src)
            SELECT x.h_order_pk, x.status, x.hashdiff, x.update_ts, 'stg.order_events'
            FROM (SELECT b.*, dwh.hash_key(b.h_order_pk::text || b.status) AS hashdiff
                  FROM batch b) x
            WHERE x.hashdiff IS DISTINCT FROM
                  (SELECT p.hk_order_status_hashdiff FROM dds.s_order_status p
                   WHERE p.h_order_pk = x.h_order_pk AND p.load_dt <= x.update_ts
                   ORDER BY p.load_dt DESC LIMIT 1)
            ON CONFLICT (h_order_pk, load_dt) DO UPDATE
            SET status = EXCLUDED.status,
                hk_order_status_hashdiff = EXCLUDED.hk_order_status_hashdiff,
                load_src = EXCLUDED.load_src
        ),
        cost_satellite AS (
            INSERT INTO dds.s_order_cost AS s
                   (h_order_pk, cost, payment, hk_order_cost_hashdiff, load_dt, load_src)
            SELECT x.h_order_pk, x.cost, x.payment, x.hashdiff, x.update_ts, 'stg.order_events'
            FROM (SELECT b.*, dwh.hash_key(b.h_order_pk::text || b.cost::text || b.payment::text)
                              AS hashdiff
                  FROM batch b) x
            WHERE x.hashdiff IS DISTINCT FROM
                  (SELECT p.hk_order_cost_hashdiff FROM dds.s_order_cost p
                   WHERE p.h_order_pk = x.h_order_pk AND p.load_dt <= x.update_ts
                   ORDER BY p.load_dt DESC LIMIT 1)
            ON CONFLICT (h_order_pk, load_dt) DO UPDATE
            SET cost = EXCLUDED.cost, payment = EXCLUDED.payment,
                hk_order_cost_hashdiff = EXCLUDED.hk_order_cost_hashdiff,
                load_src = EXCLUDED.load_src
        ),
        -- In no particular order: dwh.apply_mart_deltas writes in key order.
        product_delta_keys AS (
            SELECT array_agg(h_user_pk) AS users,
                   array_agg(h_product_pk) AS keys,
                   array_agg(d) AS deltas
            FROM product_delta
        ),
        category_delta_keys AS (
            SELECT array_agg(h_user_pk) AS users,
                   array_agg(h_category_pk) AS keys,
                   array_agg(d) AS deltas
            FROM category_delta
        )
        SELECT p.users, p.keys, p.deltas, c.users, c.keys, c.deltas
        INTO product_users, products, product_deltas,
             category_users, categories, category_deltas
        FROM product_delta_keys p, category_delta_keys c;
    END IF;

    IF TG_OP = 'UPDATE' THEN
        -- Links of the previous version that the new one no longer holds.
        WITH batch AS MATERIALIZED (
            SELECT dwh.hash_key(c.object_id::text) AS h_order_pk,
                   dwh.hash_key(c.payload->'user'->>'id') AS h_user_pk,
                   c.payload->'order_items' AS items
            FROM changed c
        ),
        stale_products AS (
            DELETE FROM dds.l_order_product l
            USING batch b
            WHERE l.h_order_pk = b.h_order_pk
              AND NOT EXISTS (SELECT FROM jsonb_array_elements(b.items) e
                              WHERE dwh.hash_key(e->>'id') = l.h_product_pk)
        )
        DELETE FROM dds.l_order_user l
        USING batch b
        WHERE l.h_order_pk = b.h_order_pk AND l.h_user_pk <> b.h_user_pk;
    END IF;

    -- The marts, after DDS: new mart rows take the dish names loaded above.
    -- (Within an ingest, deferred to the end of its upsert: one sorted pass.)
    IF NOT dwh.defer_mart_deltas(product_users, products, product_deltas,
                                 category_users, categories, category_deltas) THEN
        PERFORM dwh.apply_mart_deltas(product_users, products, product_deltas,
                                      category_users, categories, category_deltas);
    END IF;

    IF renamed IS NOT NULL THEN
        -- A rename touches mart rows that other batches may be writing.
        PERFORM pg_advisory_xact_lock(dwh.dictionary_lock_key());
        PERFORM dwh.refresh_product_names(renamed);
    END IF;

    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION dwh.order_events_changed() IS
    'AFTER INSERT/UPDATE statement trigger of stg.order_events: carries changed orders into DDS and the marts';

CREATE TRIGGER order_events_inserted
    AFTER INSERT ON stg.order_events
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_events_changed();

CREATE TRIGGER order_events_updated
    AFTER UPDATE ON stg.order_events
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_events_changed();

-- DDS is derived from the latest version of every order held here: deleting
-- one would let an older version replace it.
CREATE FUNCTION dwh.order_events_refuse_delete() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RAISE EXCEPTION 'rows of stg.order_events cannot be deleted'
        USING ERRCODE = '55000',
              DETAIL = 'stg.order_events holds the latest version of every order; DDS and the marts are derived from it.',
              HINT = 'To take an order out of the counts, load a newer version of it with another final_status.';
END
$fn$;
COMMENT ON FUNCTION dwh.order_events_refuse_delete() IS
    'Refuses DELETE and TRUNCATE on stg.order_events';

CREATE TRIGGER order_events_no_delete
    BEFORE DELETE OR TRUNCATE ON stg.order_events
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.order_events_refuse_delete();
-- Dictionaries: users and restaurants (with their menus) from Redis.  Users
-- only reach DDS (the marts carry no user names).  A menu names, renames and
-- categorises dishes: it takes the dictionary lock exclusively, because a
-- dish that moves to another category changes the category counts of every
-- CLOSED order holding it.

CREATE FUNCTION dwh.users_changed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    WITH u AS MATERIALIZED (
        SELECT c.object_id AS user_id,
               dwh.hash_key(c.object_id) AS h_user_pk,
               c.payload->>'name' AS username,
               c.payload->>'login' AS userlogin,
               coalesce(c.update_ts, c.loaded_at AT TIME ZONE 'UTC') AS version
        FROM changed c
    ),
    hub AS (
        INSERT INTO dds.h_user (h_user_pk, user_id, load_dt, load_src)
        SELECT h_user_pk, user_id, now(), 'stg.users'
        FROM u
        ORDER BY h_user_pk
        ON CONFLICT DO NOTHING
    )
    INSERT INTO dds.s_user_names AS s
           (h_user_pk, username, userlogin, hk_user_names_hashdiff, load_dt, load_src)
    SELECT x.h_user_pk, x.username, x.userlogin, x.hashdiff, x.version, 'stg.users'
    FROM (SELECT u.*, dwh.hash_key(u.h_user_pk::text || u.username || u.userlogin) AS hashdiff
          FROM u) x
    WHERE x.hashdiff IS DISTINCT FROM
          (SELECT p.hk_user_names_hashdiff FROM dds.s_user_names p
           WHERE p.h_user_pk = x.h_user_pk AND p.load_dt <= x.version
           ORDER BY p.load_dt DESC LIMIT 1)
    ORDER BY x.h_user_pk
    ON CONFLICT (h_user_pk, load_dt) DO UPDATE
    SET username = EXCLUDED.username, userlogin = EXCLUDED.userlogin,
        hk_user_names_hashdiff = EXCLUDED.hk_user_names_hashdiff,
        load_src = EXCLUDED.load_src;

    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION dwh.users_changed() IS
    'AFTER INSERT/UPDATE statement trigger of stg.users: user hubs and name satellites';

CREATE TRIGGER users_inserted
    AFTER INSERT ON stg.users
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.users_changed();

CREATE TRIGGER users_updated
    AFTER UPDATE ON stg.users
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.users_changed();

-- Move dishes to new categories and carry the change into the category
-- mart: only the CLOSED orders holding a moved dish are recounted.
CREATE FUNCTION dwh.move_products(products uuid[], categories uuid[],
                                  versions timestamp[])
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    category_users uuid[];
    category_keys uuid[];
    category_deltas integer[];
BEGIN
    WITH moved AS MATERIALIZED (
        SELECT * FROM unnest(products, categories, versions)
                 AS m(h_product_pk, h_category_pk, load_dt)
    ),
    closed AS MATERIALIZED (
        SELECT a.h_order_pk
        FROM (SELECT DISTINCT op.h_order_pk
              FROM moved m JOIN dds.l_order_product op USING (h_product_pk)) a
        WHERE (SELECT s.status FROM dds.s_order_status s
               WHERE s.h_order_pk = a.h_order_pk
               ORDER BY s.load_dt DESC LIMIT 1) = 'CLOSED'
    ),
    item AS MATERIALIZED (
        SELECT c.h_order_pk, ou.h_user_pk, op.h_product_pk
        FROM closed c
        JOIN dds.l_order_user ou USING (h_order_pk)
        JOIN dds.l_order_product op USING (h_order_pk)
    ),
    delta AS (
        SELECT h_user_pk, h_category_pk, sum(d)::integer AS d
        FROM (SELECT DISTINCT i.h_order_pk, i.h_user_pk, pc.h_category_pk, -1 AS d
              FROM item i JOIN dds.l_product_category pc USING (h_product_pk)
              UNION ALL
              SELECT DISTINCT i.h_order_pk, i.h_user_pk,
                     coalesce(m.h_category_pk, pc.h_category_pk), 1
              FROM item i
              LEFT JOIN moved m USING (h_product_pk)
              LEFT JOIN dds.l_product_category pc USING (h_product_pk)
              WHERE coalesce(m.h_category_pk, pc.h_category_pk) IS NOT NULL) x
        GROUP BY h_user_pk, h_category_pk
        HAVING sum(d) <> 0
    ),
    relink AS (
        INSERT INTO dds.l_product_category AS l
               (hk_product_category_pk, h_product_pk, h_category_pk, load_dt, load_src)
        SELECT dwh.hash_key(h_product_pk, h_category_pk), h_product_pk, h_category_pk,
               load_dt, 'stg.restaurants'
        FROM moved
        ORDER BY h_product_pk
        ON CONFLICT (h_product_pk) DO UPDATE
        SET hk_product_category_pk = EXCLUDED.hk_product_category_pk,
            h_category_pk = EXCLUDED.h_category_pk,
            load_dt = EXCLUDED.load_dt,
            load_src = EXCLUDED.load_src
    ),
    keys AS (
        SELECT array_agg(h_user_pk ORDER BY h_user_pk, h_category_pk) AS users,
               array_agg(h_category_pk ORDER BY h_user_pk, h_category_pk) AS keys,
               array_agg(d ORDER BY h_user_pk, h_category_pk) AS deltas
        FROM delta
    )
    SELECT users, keys, deltas
    INTO category_users, category_keys, category_deltas
    FROM keys;

    PERFORM dwh.apply_mart_deltas(NULL, NULL, NULL,
                                  category_users, category_keys, category_deltas);
END
$fn$;
COMMENT ON FUNCTION dwh.move_products(uuid[], uuid[], timestamp[]) IS
    'Relink dishes to new categories and recount the category mart for the CLOSED orders holding them';

CREATE FUNCTION dwh.restaurants_changed() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    renamed uuid[];
    moved_products uuid[];
    moved_categories uuid[];
    moved_versions timestamp[];
BEGIN
    IF NOT EXISTS (SELECT FROM changed) THEN
        RETURN NULL;
    END IF;

    PERFORM pg_advisory_xact_lock(dwh.dictionary_lock_key());

    WITH r AS MATERIALIZED (
        SELECT c.object_id AS restaurant_id,
               dwh.hash_key(c.object_id) AS h_restaurant_pk,
               c.payload->>'name' AS name,
               coalesce(c.update_ts, c.loaded_at AT TIME ZONE 'UTC') AS version
        FROM changed c
    ),
    hub AS (
        INSERT INTO dds.h_restaurant (h_restaurant_pk, restaurant_id, load_dt, load_src)
        SELECT h_restaurant_pk, restaurant_id, now(), 'stg.restaurants'
        FROM r
        ORDER BY h_restaurant_pk
        ON CONFLICT DO NOTHING
    )
    INSERT INTO dds.s_restaurant_names AS s
           (h_restaurant_pk, name, hk_restaurant_names_hashdiff, load_dt, load_src)
    SELECT x.h_restaurant_pk, x.name, x.hashdiff, x.version, 'stg.restaurants'
    FROM (SELECT r.*, dwh.hash_key(r.h_restaurant_pk::text || r.name) AS hashdiff
          FROM r) x
    WHERE x.hashdiff IS DISTINCT FROM
          (SELECT p.hk_restaurant_names_hashdiff FROM dds.s_restaurant_names p
           WHERE p.h_restaurant_pk = x.h_restaurant_pk AND p.load_dt <= x.version
           ORDER BY p.load_dt DESC LIMIT 1)
    ORDER BY x.h_restaurant_pk
    ON CONFLICT (h_restaurant_pk, load_dt) DO UPDATE
    SET name = EXCLUDED.name,
        hk_restaurant_names_hashdiff = EXCLUDED.hk_restaurant_names_hashdiff,
        load_src = EXCLUDED.load_src;

    -- Menu entries with an empty _id name no dish and are skipped.
    SELECT dwh.load_products(array_agg(dwh.hash_key(e->>'_id')), array_agg(e->>'_id'),
                             array_agg(e->>'name'),
                             array_agg(coalesce(c.update_ts, c.loaded_at AT TIME ZONE 'UTC')),
                             'stg.restaurants')
    INTO renamed
    FROM changed c, jsonb_array_elements(c.payload->'menu') e
    WHERE e->>'_id' <> '';

    WITH dish AS MATERIALIZED (
        SELECT dwh.hash_key(c.object_id) AS h_restaurant_pk,
               dwh.hash_key(e->>'_id') AS h_product_pk,
               nullif(e->>'category', '') AS category_name,
               coalesce(c.update_ts, c.loaded_at AT TIME ZONE 'UTC') AS version
        FROM changed c, jsonb_array_elements(c.payload->'menu') e
        WHERE e->>'_id' <> ''
    ),
    restaurant_link AS (
        INSERT INTO dds.l_product_restaurant
               (hk_product_restaurant_pk, h_product_pk, h_restaurant_pk, load_dt, load_src)
        SELECT DISTINCT dwh.hash_key(h_product_pk, h_restaurant_pk), h_product_pk,
               h_restaurant_pk, now(), 'stg.restaurants'
        FROM dish
        ORDER BY 1
        ON CONFLICT DO NOTHING
    ),
    category_hub AS (
        INSERT INTO dds.h_category (h_category_pk, category_name, load_dt, load_src)
        SELECT DISTINCT dwh.hash_key(category_name), category_name, now(), 'stg.restaurants'
        FROM dish
        WHERE category_name IS NOT NULL
        ORDER BY 1
        ON CONFLICT DO NOTHING
    ),
    -- The newest menu naming a dish decides its category.
    candidate AS (
        SELECT DISTINCT ON (h_product_pk) h_product_pk, category_name,
               dwh.hash_key(category_name) AS h_category_pk, version
        FROM dish
        WHERE category_name IS NOT NULL
        ORDER BY h_product_pk, version DESC, category_name DESC
    ),
    moved AS (
        SELECT c.*
        FROM candidate c
        LEFT JOIN dds.l_product_category l USING (h_product_pk)
        LEFT JOIN dds.h_category h ON h.h_category_pk = l.h_category_pk
        WHERE l.h_product_pk IS NULL
           OR (l.h_category_pk <> c.h_category_pk
               AND (c.version > l.load_dt
                    OR (c.version = l.load_dt AND c.category_name > h.category_name)))
    )
    SELECT array_agg(h_product_pk), array_agg(h_category_pk), array_agg(version)
    INTO moved_products, moved_categories, moved_versions
    FROM moved;

    IF moved_products IS NOT NULL THEN
        PERFORM dwh.move_products(moved_products, moved_categories, moved_versions);
    END IF;
    IF renamed IS NOT NULL THEN
        PERFORM dwh.refresh_product_names(renamed);
    END IF;

    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION dwh.restaurants_changed() IS
    'AFTER INSERT/UPDATE statement trigger of stg.restaurants: restaurants, dishes, categories and the marts they change';

CREATE TRIGGER restaurants_inserted
    AFTER INSERT ON stg.restaurants
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.restaurants_changed();

CREATE TRIGGER restaurants_updated
    AFTER UPDATE ON stg.restaurants
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.restaurants_changed();
-- Ingest entry points: raw Kafka message values in, STG rows or dead
-- letters out.  Nothing is lost: a value that cannot be stored is kept here
-- with its raw bytes, where it came from and why it was refused.

CREATE TABLE dwh.dead_letters (
    id              bigserial PRIMARY KEY,
    received_at     timestamptz NOT NULL DEFAULT now(),
    source          text NOT NULL,
    topic           text,
    kafka_partition integer,
    kafka_offset    bigint,
    source_key      text,
    raw             bytea NOT NULL,
    reason          text NOT NULL,
    sqlstate        char(5) NOT NULL
);
CREATE INDEX dead_letters_received_at_idx ON dwh.dead_letters (received_at);
-- A message replayed from Kafka (dwh.kafka_seek) is dead-lettered once.
CREATE UNIQUE INDEX dead_letters_kafka_position_idx
    ON dwh.dead_letters (topic, kafka_partition, kafka_offset)
    WHERE kafka_offset IS NOT NULL;
COMMENT ON TABLE dwh.dead_letters IS 'Values that could not be loaded, with their raw bytes, origin and reason';
COMMENT ON COLUMN dwh.dead_letters.id IS 'Surrogate row number';
COMMENT ON COLUMN dwh.dead_letters.received_at IS 'When the value was refused';
COMMENT ON COLUMN dwh.dead_letters.source IS 'Who handed it in: kafka (the Kafka worker), redis (the Redis worker) or sql (dwh.ingest_order[s])';
COMMENT ON COLUMN dwh.dead_letters.topic IS 'Kafka topic, when known';
COMMENT ON COLUMN dwh.dead_letters.kafka_partition IS 'Kafka partition, when known';
COMMENT ON COLUMN dwh.dead_letters.kafka_offset IS 'Kafka offset, when known';
COMMENT ON COLUMN dwh.dead_letters.source_key IS 'Redis key (or Kafka message key), when known';
COMMENT ON COLUMN dwh.dead_letters.raw IS 'The value exactly as received';
COMMENT ON COLUMN dwh.dead_letters.reason IS 'Why it was refused';
COMMENT ON COLUMN dwh.dead_letters.sqlstate IS 'SQLSTATE of the refusal (22P02 wrong shape, 22032 not JSON, 22021 bad UTF-8, 22007 bad timestamp, 22003 out of range, 54000 too large, ...)';

CREATE FUNCTION dwh.ingest_order(message bytea, topic text DEFAULT NULL,
                                 kafka_partition integer DEFAULT NULL,
                                 kafka_offset bigint DEFAULT NULL)
    RETURNS text
    AS 'MODULE_PATHNAME', 'dwh_ingest_order'
    LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION dwh.ingest_order(bytea, text, integer, bigint) IS
    'Ingest one raw Kafka message value; returns applied, unchanged, other_type or dead_letter';

CREATE FUNCTION dwh.ingest_order(message text, topic text DEFAULT NULL,
                                 kafka_partition integer DEFAULT NULL,
                                 kafka_offset bigint DEFAULT NULL)
    RETURNS text
    AS 'MODULE_PATHNAME', 'dwh_ingest_order'
    LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION dwh.ingest_order(text, text, integer, bigint) IS
    'Ingest one Kafka message value given as text; returns applied, unchanged, other_type or dead_letter';

CREATE FUNCTION dwh.ingest_orders(messages bytea[], topic text DEFAULT NULL,
                                  kafka_partitions integer[] DEFAULT NULL,
                                  kafka_offsets bigint[] DEFAULT NULL,
                                  OUT received integer, OUT applied integer,
                                  OUT unchanged integer, OUT other_type integer,
                                  OUT dead_lettered integer)
    AS 'MODULE_PATHNAME', 'dwh_ingest_orders'
    LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION dwh.ingest_orders(bytea[], text, integer[], bigint[]) IS
    'Ingest a batch of raw Kafka message values set-based: one statement per destination';

CREATE FUNCTION dwh.defer_mart_deltas(product_users uuid[], products uuid[],
                                      product_deltas integer[],
                                      category_users uuid[], categories uuid[],
                                      category_deltas integer[])
    RETURNS boolean
    AS 'MODULE_PATHNAME', 'dwh_defer_mart_deltas'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION dwh.defer_mart_deltas(uuid[], uuid[], integer[], uuid[], uuid[], integer[]) IS
    'Internal: inside an ingest, keep the order trigger''s mart deltas for one sorted pass at the end of the upsert; false elsewhere';

-- Replay: after a fix (a new dwh version, a corrected producer, a raised
-- dwh.max_message_size), hand dead letters back to the ingest function.
-- Each replayed row is removed; one still refused is recorded again, with
-- its new reason, under a new id.
CREATE FUNCTION dwh.replay_dead_letters(ids bigint[] DEFAULT NULL)
    RETURNS TABLE (dead_letter_id bigint, outcome text)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    d dwh.dead_letters;
BEGIN
    FOR d IN
        SELECT * FROM dwh.dead_letters
        WHERE (ids IS NULL OR id = ANY (ids)) AND source IN ('kafka', 'sql')
        ORDER BY id
        FOR UPDATE
    LOOP
        DELETE FROM dwh.dead_letters WHERE id = d.id;
        dead_letter_id := d.id;
        outcome := dwh.ingest_order(d.raw, d.topic, d.kafka_partition, d.kafka_offset);
        RETURN NEXT;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION dwh.replay_dead_letters(bigint[]) IS
    'Ingest order dead letters again (all, or those ids); returns what became of each';
-- Kafka: the offsets applied, stored in the transaction of each batch, and
-- the status of the workers.

CREATE TABLE dwh.kafka_offsets (
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    next_offset     bigint,
    seek_requested  boolean NOT NULL DEFAULT false,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, kafka_partition)
);
COMMENT ON TABLE dwh.kafka_offsets IS 'How far each Kafka partition has been applied; written in the transaction of each batch, so the single truth a worker resumes from';
COMMENT ON COLUMN dwh.kafka_offsets.topic IS 'Kafka topic';
COMMENT ON COLUMN dwh.kafka_offsets.kafka_partition IS 'Partition number';
COMMENT ON COLUMN dwh.kafka_offsets.next_offset IS 'Offset of the first message not applied yet (NULL: none applied)';
COMMENT ON COLUMN dwh.kafka_offsets.seek_requested IS 'Set by dwh.kafka_seek(): the owning worker must move to next_offset';
COMMENT ON COLUMN dwh.kafka_offsets.updated_at IS 'When the row last changed';

CREATE FUNCTION dwh.kafka_seek(kafka_partition integer, next_offset bigint,
                               topic text DEFAULT NULL)
    RETURNS void
    AS 'MODULE_PATHNAME', 'dwh_kafka_seek'
    LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION dwh.kafka_seek(integer, bigint, text) IS
    'Rewind (replay) or skip a partition of the order topic (default dwh.kafka_topic): the next message applied from it is the one at next_offset';

CREATE FUNCTION dwh.worker_status(
        OUT worker text, OUT pid integer, OUT started_at timestamptz,
        OUT state text, OUT state_since timestamptz, OUT partitions integer[],
        OUT messages bigint, OUT batches bigint, OUT dead_letters bigint,
        OUT last_batch_at timestamptz,
        OUT keys_mirrored bigint, OUT keys_missing bigint,
        OUT refreshes bigint, OUT changes_found bigint,
        OUT last_error text, OUT last_error_at timestamptz,
        OUT worker_number integer)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'dwh_worker_status'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION dwh.worker_status() IS
    'State of each background worker since the server started (behind dwh.status)';

CREATE FUNCTION dwh.kafka_watermarks(
        OUT topic text, OUT kafka_partition integer,
        OUT low_watermark bigint, OUT high_watermark bigint,
        OUT observed_at timestamptz, OUT worker_number integer)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'dwh_kafka_watermarks'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION dwh.kafka_watermarks() IS
    'The broker''s watermarks of each partition as the workers last saw them (behind dwh.kafka_partitions)';

CREATE VIEW dwh.kafka_partitions AS
SELECT coalesce(o.topic, w.topic) AS topic,
       coalesce(o.kafka_partition, w.kafka_partition) AS kafka_partition,
       owner.worker,
       o.next_offset AS stored_offset,
       w.high_watermark,
       greatest(w.high_watermark - coalesce(o.next_offset, w.low_watermark), 0) AS lag,
       o.updated_at AS stored_at,
       w.observed_at AS watermark_at
FROM dwh.kafka_offsets o
FULL JOIN dwh.kafka_watermarks() w
       ON w.topic = o.topic AND w.kafka_partition = o.kafka_partition
LEFT JOIN (SELECT s.worker, p.p
           FROM dwh.worker_status() s, unnest(s.partitions) AS p(p)
           WHERE s.pid IS NOT NULL) owner
       ON owner.p = coalesce(o.kafka_partition, w.kafka_partition)
      AND coalesce(o.topic, w.topic) = current_setting('dwh.kafka_topic');
COMMENT ON VIEW dwh.kafka_partitions IS
    'Per Kafka partition: the worker owning it, the offset stored in the database, the broker''s high watermark and the lag between them';

CREATE VIEW dwh.status AS
SELECT s.worker, s.pid, s.state, s.state_since,
       s.partitions,
       s.messages, s.batches, s.dead_letters, s.last_batch_at,
       p.lag,
       p.partition_offsets,
       s.keys_mirrored, s.keys_missing, s.refreshes, s.changes_found,
       s.last_error, s.last_error_at, s.started_at
FROM dwh.worker_status() s
LEFT JOIN LATERAL (
    SELECT sum(k.lag)::bigint AS lag,
           jsonb_agg(jsonb_build_object('partition', k.kafka_partition,
                                        'stored_offset', k.stored_offset,
                                        'high_watermark', k.high_watermark,
                                        'lag', k.lag)
                     ORDER BY k.kafka_partition) AS partition_offsets
    FROM dwh.kafka_partitions k
    WHERE k.topic = current_setting('dwh.kafka_topic')
      AND k.kafka_partition = ANY (s.partitions)
) p ON true
ORDER BY s.worker_number IS NULL, s.worker;
COMMENT ON VIEW dwh.status IS
    'One row per background worker: its state, partitions, throughput counters, lag, and last error';
-- Redis: the keys the dictionary worker mirrors, and the queue of ids that
-- new orders name.

CREATE TABLE dwh.redis_keys (
    key           text COLLATE "C" PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('user', 'restaurant', 'unknown')),
    state         text NOT NULL CHECK (state IN ('new', 'mirrored', 'missing', 'refused')),
    value_hash    bytea,
    reason        text,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    changed_at    timestamptz
);
CREATE INDEX redis_keys_new_idx ON dwh.redis_keys (key) WHERE state = 'new';
COMMENT ON TABLE dwh.redis_keys IS 'Every Redis key the dictionary worker mirrors: the user and restaurant ids of DDS, and the keys found by SCAN';
COMMENT ON COLUMN dwh.redis_keys.key IS 'Redis key: a user or restaurant id';
COMMENT ON COLUMN dwh.redis_keys.kind IS 'user or restaurant (from the value''s shape once read, from the hub that named it before), unknown for a key found by SCAN and not read yet';
COMMENT ON COLUMN dwh.redis_keys.state IS 'new (not read yet), mirrored (its value is in stg.users or stg.restaurants), missing (Redis holds no string under it), refused (its value is in dwh.dead_letters)';
COMMENT ON COLUMN dwh.redis_keys.value_hash IS '128-bit hash of the value last read: a refresh that reads the same value writes nothing, and the same refused value is dead-lettered once';
COMMENT ON COLUMN dwh.redis_keys.reason IS 'Why the value was refused (state refused)';
COMMENT ON COLUMN dwh.redis_keys.first_seen_at IS 'When the key was first named by an order, found by SCAN or found in DDS';
COMMENT ON COLUMN dwh.redis_keys.changed_at IS 'When the state or the value last changed';

-- Ids of users and restaurants new to DDS, for the worker to read.  A
-- queue: the worker empties it every second (and compares the hubs with
-- dwh.redis_keys on every refresh, so nothing is lost if it is).  No key:
-- concurrent order batches never wait on each other here, and the
-- duplicates a restore may add (the hubs' COPY fires the trigger) are
-- harmless.
CREATE TABLE dwh.redis_wanted (
    key   text NOT NULL,
    kind  text NOT NULL
);
COMMENT ON TABLE dwh.redis_wanted IS 'Queue of user and restaurant ids new to DDS, emptied by the Redis worker into dwh.redis_keys';
COMMENT ON COLUMN dwh.redis_wanted.key IS 'User or restaurant id';
COMMENT ON COLUMN dwh.redis_wanted.kind IS 'user or restaurant';

CREATE FUNCTION dwh.redis_queue_keys() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF TG_ARGV[0] = 'user' THEN
        INSERT INTO dwh.redis_wanted (key, kind) SELECT user_id, 'user' FROM inserted;
    ELSE
        INSERT INTO dwh.redis_wanted (key, kind) SELECT restaurant_id, 'restaurant' FROM inserted;
    END IF;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION dwh.redis_queue_keys() IS
    'AFTER INSERT statement trigger of dds.h_user and dds.h_restaurant: queues the new ids for the Redis worker';

CREATE TRIGGER redis_wanted
    AFTER INSERT ON dds.h_user
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.redis_queue_keys('user');

CREATE TRIGGER redis_wanted
    AFTER INSERT ON dds.h_restaurant
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.redis_queue_keys('restaurant');
-- The oracle: the marts recomputed from DDS from scratch.  dwh.verify()
-- lists every difference with the maintained marts (none: consistent),
-- dwh.rebuild() makes the marts equal to the recomputation.

CREATE VIEW dwh.order_current_status AS
SELECT DISTINCT ON (h_order_pk) h_order_pk, status, load_dt
FROM dds.s_order_status
ORDER BY h_order_pk, load_dt DESC;
COMMENT ON VIEW dwh.order_current_status IS 'Current final status of every order (its newest status satellite row)';

CREATE VIEW dwh.product_current_name AS
SELECT DISTINCT ON (h_product_pk) h_product_pk, name, load_dt
FROM dds.s_product_names
ORDER BY h_product_pk, load_dt DESC;
COMMENT ON VIEW dwh.product_current_name IS 'Current name of every dish (its newest name satellite row)';

CREATE VIEW dwh.expected_user_product_counters AS
SELECT ou.h_user_pk AS user_id, op.h_product_pk AS product_id,
       pn.name AS product_name, count(*)::integer AS order_cnt
FROM dwh.order_current_status st
JOIN dds.l_order_user ou USING (h_order_pk)
JOIN dds.l_order_product op USING (h_order_pk)
LEFT JOIN dwh.product_current_name pn USING (h_product_pk)
WHERE st.status = 'CLOSED'
GROUP BY ou.h_user_pk, op.h_product_pk, pn.name;
COMMENT ON VIEW dwh.expected_user_product_counters IS 'cdm.user_product_counters recomputed from DDS';

CREATE VIEW dwh.expected_user_category_counters AS
SELECT ou.h_user_pk AS user_id, pc.h_category_pk AS category_id,
       hc.category_name, count(DISTINCT st.h_order_pk)::integer AS order_cnt
FROM dwh.order_current_status st
JOIN dds.l_order_user ou USING (h_order_pk)
JOIN dds.l_order_product op USING (h_order_pk)
JOIN dds.l_product_category pc USING (h_product_pk)
JOIN dds.h_category hc USING (h_category_pk)
WHERE st.status = 'CLOSED'
GROUP BY ou.h_user_pk, pc.h_category_pk, hc.category_name;
COMMENT ON VIEW dwh.expected_user_category_counters IS 'cdm.user_category_counters recomputed from DDS';

CREATE FUNCTION dwh.verify()
    RETURNS TABLE (mart text, user_id uuid, item_id uuid,
                   expected_name text, actual_name text,
                   expected_cnt integer, actual_cnt integer)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT 'user_product_counters', coalesce(e.user_id, a.user_id),
           coalesce(e.product_id, a.product_id), e.product_name, a.product_name,
           e.order_cnt, a.order_cnt
    FROM dwh.expected_user_product_counters e
    FULL JOIN cdm.user_product_counters a
      ON a.user_id = e.user_id AND a.product_id = e.product_id
    WHERE e.user_id IS NULL OR a.user_id IS NULL
       OR e.order_cnt <> a.order_cnt OR e.product_name IS DISTINCT FROM a.product_name
    UNION ALL
    SELECT 'user_category_counters', coalesce(e.user_id, a.user_id),
           coalesce(e.category_id, a.category_id), e.category_name, a.category_name,
           e.order_cnt, a.order_cnt
    FROM dwh.expected_user_category_counters e
    FULL JOIN cdm.user_category_counters a
      ON a.user_id = e.user_id AND a.category_id = e.category_id
    WHERE e.user_id IS NULL OR a.user_id IS NULL
       OR e.order_cnt <> a.order_cnt OR e.category_name IS DISTINCT FROM a.category_name
    ORDER BY 1, 2, 3;
$fn$;
COMMENT ON FUNCTION dwh.verify() IS
    'Differences between the marts and their recomputation from DDS; no rows means consistent';

CREATE FUNCTION dwh.rebuild(OUT mart text, OUT rows_changed bigint)
    RETURNS SETOF record
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    -- No order batch or dictionary change runs meanwhile; readers go on.
    PERFORM pg_advisory_xact_lock(dwh.dictionary_lock_key());
    LOCK TABLE cdm.user_product_counters, cdm.user_category_counters
        IN SHARE ROW EXCLUSIVE MODE;

    mart := 'user_product_counters';
    WITH e AS MATERIALIZED (SELECT * FROM dwh.expected_user_product_counters),
    upsert AS (
        INSERT INTO cdm.user_product_counters AS m (user_id, product_id, product_name, order_cnt)
        SELECT user_id, product_id, coalesce(product_name, ''), order_cnt
        FROM e
        ORDER BY user_id, product_id
        ON CONFLICT (user_id, product_id) DO UPDATE
        SET product_name = EXCLUDED.product_name, order_cnt = EXCLUDED.order_cnt
        WHERE (m.product_name, m.order_cnt) IS DISTINCT FROM
              (EXCLUDED.product_name, EXCLUDED.order_cnt)
        RETURNING 1
    ),
    extra AS (
        DELETE FROM cdm.user_product_counters m
        WHERE NOT EXISTS (SELECT FROM e
                          WHERE e.user_id = m.user_id AND e.product_id = m.product_id)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM upsert) + (SELECT count(*) FROM extra) INTO rows_changed;
    RETURN NEXT;

    mart := 'user_category_counters';
    WITH e AS MATERIALIZED (SELECT * FROM dwh.expected_user_category_counters),
    upsert AS (
        INSERT INTO cdm.user_category_counters AS m (user_id, category_id, category_name, order_cnt)
        SELECT user_id, category_id, category_name, order_cnt
        FROM e
        ORDER BY user_id, category_id
        ON CONFLICT (user_id, category_id) DO UPDATE
        SET category_name = EXCLUDED.category_name, order_cnt = EXCLUDED.order_cnt
        WHERE (m.category_name, m.order_cnt) IS DISTINCT FROM
              (EXCLUDED.category_name, EXCLUDED.order_cnt)
        RETURNING 1
    ),
    extra AS (
        DELETE FROM cdm.user_category_counters m
        WHERE NOT EXISTS (SELECT FROM e
                          WHERE e.user_id = m.user_id AND e.category_id = m.category_id)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM upsert) + (SELECT count(*) FROM extra) INTO rows_changed;
    RETURN NEXT;
END
$fn$;
COMMENT ON FUNCTION dwh.rebuild() IS
    'Make both marts equal to their recomputation from DDS; returns the rows changed per mart';
-- Backups: tables created by an extension are left out of pg_dump unless
-- registered here.  Every data table and its sequence is (one statement
-- each: every call rewrites the extension's catalog row).
SELECT pg_catalog.pg_extension_config_dump('stg.order_events', '');
SELECT pg_catalog.pg_extension_config_dump('stg.order_events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('stg.other_events', '');
SELECT pg_catalog.pg_extension_config_dump('stg.other_events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('stg.users', '');
SELECT pg_catalog.pg_extension_config_dump('stg.users_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('stg.restaurants', '');
SELECT pg_catalog.pg_extension_config_dump('stg.restaurants_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('dds.h_user', '');
SELECT pg_catalog.pg_extension_config_dump('dds.h_product', '');
SELECT pg_catalog.pg_extension_config_dump('dds.h_category', '');
SELECT pg_catalog.pg_extension_config_dump('dds.h_restaurant', '');
SELECT pg_catalog.pg_extension_config_dump('dds.h_order', '');
SELECT pg_catalog.pg_extension_config_dump('dds.l_order_user', '');
SELECT pg_catalog.pg_extension_config_dump('dds.l_order_product', '');
SELECT pg_catalog.pg_extension_config_dump('dds.l_product_restaurant', '');
SELECT pg_catalog.pg_extension_config_dump('dds.l_product_category', '');
SELECT pg_catalog.pg_extension_config_dump('dds.s_user_names', '');
SELECT pg_catalog.pg_extension_config_dump('dds.s_product_names', '');
SELECT pg_catalog.pg_extension_config_dump('dds.s_restaurant_names', '');
SELECT pg_catalog.pg_extension_config_dump('dds.s_order_cost', '');
SELECT pg_catalog.pg_extension_config_dump('dds.s_order_status', '');
SELECT pg_catalog.pg_extension_config_dump('cdm.user_product_counters', '');
SELECT pg_catalog.pg_extension_config_dump('cdm.user_product_counters_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('cdm.user_category_counters', '');
SELECT pg_catalog.pg_extension_config_dump('cdm.user_category_counters_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.dead_letters', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.dead_letters_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.kafka_offsets', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.redis_keys', '');
SELECT pg_catalog.pg_extension_config_dump('dwh.redis_wanted', '');

-- PUBLIC gets nothing: functions are executable by PUBLIC by default.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dwh FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA dwh FROM PUBLIC;
