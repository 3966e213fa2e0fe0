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
