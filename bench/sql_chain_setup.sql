-- Benchmark of the SQL chain (bench/sql_chain.sh): the deterministic
-- generator of the docs/formats.md section 5 data profile.  Everything lives in
-- schema bench of the throw-away benchmark database; nothing here is part of
-- the extension.
--
-- Every field of order n is derived from hashint8extended(n, salt), never
-- from random(): any run, any machine produces the same messages.

CREATE SCHEMA bench;

-- Parameters of the run, set by the driver script.
CREATE TABLE bench.params (
    history     bigint NOT NULL,    -- orders loaded before the measured phase
    measured    bigint NOT NULL,    -- orders of the measured phase
    batch       integer NOT NULL    -- messages per dwh.ingest_orders call
);

-- A non-negative 31-bit hash of (n, salt); inlined by the planner.
CREATE FUNCTION bench.hs(n bigint, salt bigint) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT hashint8extended(n, salt) & 2147483647';

-- The 4 restaurants of the profile; Кубдари's 52 menu entries are 51 dishes
-- and the blank entry {"_id": "", ...}: 133 menu entries, 132 dishes.
CREATE TABLE bench.restaurant (
    idx         integer PRIMARY KEY,
    restaurant_id text NOT NULL,
    name        text NOT NULL,
    n_dishes    integer NOT NULL,
    upper_names boolean NOT NULL
);
INSERT INTO bench.restaurant VALUES
    (0, '626a81cfefa404208fe9abae', 'Кофейня №1', 21, true),
    (1, 'a51e4e31ae4602047ec52534', 'Кубдари',    51, false),
    (2, 'ebfa4c9b8dadfc1da37ab58d', 'PLove',      11, false),
    (3, 'ef8c42c19b7518a9aebec106', 'Вкус Индии', 49, false);

-- 132 dishes in 10 categories of sizes 28, 5, 11, 35, 4, 36, 1, 5, 6, 1,
-- dealt to the restaurants in a hash order; pos numbers a restaurant's dishes.
CREATE TABLE bench.dish AS
WITH cat(ord, name, size) AS (
    VALUES (1, 'Закуски', 28), (2, 'Салаты', 5), (3, 'Супы', 11),
           (4, 'Основные блюда', 35), (5, 'Гарниры', 4), (6, 'Выпечка', 36),
           (7, 'Десерты', 1), (8, 'Напитки', 5), (9, 'Соусы', 6), (10, 'Чай', 1)
),
slot AS (
    SELECT (row_number() OVER (ORDER BY c.ord, g))::integer AS idx,
           c.name AS category, g AS nth
    FROM cat c, generate_series(1, c.size) g
),
ranked AS (
    SELECT s.*, row_number() OVER (ORDER BY md5('dwh-bench-deal-' || s.idx)) AS rnk
    FROM slot s
),
placed AS (
    SELECT r.*,
           CASE WHEN rnk <= 21 THEN 0 WHEN rnk <= 72 THEN 1
                WHEN rnk <= 83 THEN 2 ELSE 3 END AS restaurant_idx
    FROM ranked r
),
sample(i, name) AS (
    SELECT s.i, s.name FROM unnest(ARRAY[
        'Бомбей Тикки', 'Чиккен Тикка', 'Пхали с фасолью', 'Долма', 'Шурпа из баранины',
        'Лагман', 'Суп куриный', 'Казан кебаб с говядиной', 'Плов ферганский', 'Палак Панир',
        'Круассан с ветчиной', 'Чиз Наан', 'Хачапури по-мегрельски', 'Салат Оливье',
        'Рис с шафраном', 'Сладкий Ласси', 'Лимонад грузинский', 'Соус Ткемали', 'Пахлава',
        'Чай Масала']) WITH ORDINALITY AS s(name, i)
)
SELECT p.idx,
       substr(md5('dwh-bench-dish-' || p.idx), 1, 24) AS dish_id,
       CASE WHEN r.upper_names THEN upper(coalesce(s.name, p.category || ' №' || p.nth))
            ELSE coalesce(s.name, p.category || ' №' || p.nth) END AS name,
       CASE WHEN r.upper_names
            THEN 60 + 10 * (bench.hs(p.idx, 901) % 13)
            ELSE 50 + 10 * floor(74 * power((bench.hs(p.idx, 902) % 10000) / 10000.0, 1.7))
       END::integer AS price,
       p.category,
       p.restaurant_idx,
       (row_number() OVER (PARTITION BY p.restaurant_idx ORDER BY p.rnk) - 1)::integer AS pos
FROM placed p
JOIN bench.restaurant r ON r.idx = p.restaurant_idx
LEFT JOIN sample s ON s.i = p.idx;
ALTER TABLE bench.dish ADD PRIMARY KEY (idx);
CREATE UNIQUE INDEX ON bench.dish (restaurant_idx, pos);

-- 100 users, ids 626a81ce9a8cd1920641e2xx, Russian three-part names.
CREATE TABLE bench.users AS
SELECT k AS idx,
       '626a81ce9a8cd1920641e2' || lpad(to_hex(k), 2, '0') AS user_id,
       (ARRAY['Иванов', 'Петров', 'Сидоров', 'Кузнецов', 'Смирнов', 'Попов', 'Лебедев',
              'Козлов', 'Новиков', 'Морозов'])[1 + k % 10] || ' ' ||
       (ARRAY['Гаврила', 'Аркадий', 'Борис', 'Вениамин', 'Глеб', 'Демьян', 'Ефим',
              'Захар', 'Игнат', 'Кирилл'])[1 + k / 10] || ' ' ||
       (ARRAY['Архипович', 'Петрович', 'Ильич', 'Саввич', 'Фомич', 'Лукич', 'Кузьмич',
              'Никитич', 'Олегович', 'Юрьевич'])[1 + (k * 7 + 3) % 10] AS name,
       'user_' || lpad(k::text, 3, '0') || '_' || (1000 + bench.hs(k, 903) % 9000) AS login
FROM generate_series(0, 99) k;
ALTER TABLE bench.users ADD PRIMARY KEY (idx);

-- Dictionary values as the Redis worker would store them (docs/formats.md 2);
-- their versions precede the first order.
CREATE VIEW bench.user_values AS
SELECT u.user_id AS object_id,
       jsonb_build_object('_id', u.user_id, 'name', u.name, 'login', u.login,
                          'update_ts_utc', '2022-12-31 10:00:00') AS payload
FROM bench.users u;

CREATE VIEW bench.restaurant_values AS
SELECT r.restaurant_id AS object_id,
       jsonb_build_object(
           '_id', r.restaurant_id, 'name', r.name,
           'menu', (SELECT jsonb_agg(e ORDER BY ord)
                    FROM (SELECT jsonb_build_object('_id', d.dish_id, 'name', d.name,
                                                    'price', d.price, 'category', d.category) AS e,
                                 d.pos AS ord
                          FROM bench.dish d WHERE d.restaurant_idx = r.idx
                          UNION ALL
                          SELECT '{"_id": "", "name": "", "price": 0, "category": ""}'::jsonb, 1000
                          WHERE r.idx = 1) m),
           'update_ts_utc', '2022-12-31 11:00:00') AS payload
FROM bench.restaurant r;

-- Orders first..last: the header of each order.  Order n has object_id
-- 1000000 + n (7 digits), a user and a restaurant, 1 to 5 distinct dishes
-- of that restaurant's menu (pos = start + j * step mod n_dishes, step
-- prime to every menu size), CLOSED for 9 orders in 10, CANCELLED otherwise,
-- and a final status 15 s (+ jitter) after the previous order's.
CREATE FUNCTION bench.order_head(first bigint, last bigint)
    RETURNS TABLE (n bigint, object_id bigint, user_idx integer, restaurant_idx integer,
                   n_items integer, start integer, step integer, n_dishes integer,
                   final_status text, final_ts timestamp, duration integer, send_delay integer)
    LANGUAGE sql STABLE
AS $fn$
    SELECT g.n, 1000000 + g.n,
           (bench.hs(g.n, 1) % 100)::integer,
           r.idx,
           (1 + bench.hs(g.n, 3) % 5)::integer,
           (bench.hs(g.n, 4) % r.n_dishes)::integer,
           (ARRAY[1, 2, 4, 5, 8, 10, 13, 16, 19, 20])[1 + bench.hs(g.n, 5) % 10],
           r.n_dishes,
           CASE WHEN bench.hs(g.n, 6) % 10 = 0 THEN 'CANCELLED' ELSE 'CLOSED' END,
           timestamp '2023-01-01 00:00:00' + make_interval(secs => g.n * 15 + bench.hs(g.n, 7) % 15),
           (3600 + bench.hs(g.n, 8) % 3600)::integer,
           (120 + bench.hs(g.n, 9) % (7 * 86400))::integer
    FROM generate_series(first, last) AS g(n)
    JOIN bench.restaurant r ON r.idx = bench.hs(g.n, 2) % 4
$fn$;

-- The lines (distinct dishes) of orders first..last.
CREATE FUNCTION bench.order_lines(first bigint, last bigint)
    RETURNS TABLE (n bigint, user_idx integer, final_status text, line integer,
                   dish_idx integer, quantity integer)
    LANGUAGE sql STABLE
AS $fn$
    SELECT h.n, h.user_idx, h.final_status, j, d.idx,
           (1 + bench.hs(h.n, 100 + j) % 5)::integer
    FROM bench.order_head(first, last) h
    CROSS JOIN LATERAL generate_series(0, h.n_items - 1) AS j
    JOIN bench.dish d ON d.restaurant_idx = h.restaurant_idx
                     AND d.pos = (h.start + j * h.step) % h.n_dishes
$fn$;

CREATE FUNCTION bench.ts_text(ts timestamp) RETURNS text
    LANGUAGE sql IMMUTABLE
    AS $$SELECT to_char(ts, 'YYYY-MM-DD HH24:MI:SS')$$;

-- The Kafka message values (docs/formats.md 1) of orders first..last.
CREATE FUNCTION bench.messages(first bigint, last bigint)
    RETURNS TABLE (n bigint, message bytea)
    LANGUAGE sql STABLE
AS $fn$
    WITH head AS MATERIALIZED (
        SELECT * FROM bench.order_head(first, last)
    ),
    line AS (
        SELECT h.n,
               json_agg(json_build_object('id', d.dish_id, 'name', d.name,
                                          'price', d.price, 'quantity', q.quantity)
                        ORDER BY j) AS items,
               sum(d.price * q.quantity) AS cost
        FROM head h
        CROSS JOIN LATERAL generate_series(0, h.n_items - 1) AS j
        CROSS JOIN LATERAL (SELECT (1 + bench.hs(h.n, 100 + j) % 5)::integer AS quantity) q
        JOIN bench.dish d ON d.restaurant_idx = h.restaurant_idx
                         AND d.pos = (h.start + j * h.step) % h.n_dishes
        GROUP BY h.n
    )
    SELECT h.n,
           convert_to(json_build_object(
               'object_id', h.object_id,
               'object_type', 'order',
               'sent_dttm', bench.ts_text(h.final_ts + make_interval(secs => h.send_delay)),
               'payload', json_build_object(
                   'restaurant', json_build_object('id', r.restaurant_id),
                   'date', bench.ts_text(h.final_ts),
                   'user', json_build_object('id', u.user_id),
                   'order_items', l.items,
                   'bonus_payment', 0,
                   'cost', l.cost,
                   'payment', l.cost,
                   'bonus_grant', 0,
                   'statuses', CASE WHEN h.final_status = 'CLOSED' THEN json_build_array(
                       json_build_object('status', 'CLOSED', 'dttm', bench.ts_text(h.final_ts)),
                       json_build_object('status', 'DELIVERING', 'dttm',
                           bench.ts_text(h.final_ts - make_interval(secs => h.duration * 35 / 100))),
                       json_build_object('status', 'COOKING', 'dttm',
                           bench.ts_text(h.final_ts - make_interval(secs => h.duration * 80 / 100))),
                       json_build_object('status', 'OPEN', 'dttm',
                           bench.ts_text(h.final_ts - make_interval(secs => h.duration))))
                   ELSE json_build_array(
                       json_build_object('status', h.final_status, 'dttm', bench.ts_text(h.final_ts)),
                       json_build_object('status', 'COOKING', 'dttm',
                           bench.ts_text(h.final_ts - make_interval(secs => h.duration * 80 / 100))),
                       json_build_object('status', 'OPEN', 'dttm',
                           bench.ts_text(h.final_ts - make_interval(secs => h.duration))))
                   END,
                   'final_status', h.final_status,
                   'update_ts', bench.ts_text(h.final_ts)))::text, 'UTF8')
    FROM head h
    JOIN line l USING (n)
    JOIN bench.restaurant r ON r.idx = h.restaurant_idx
    JOIN bench.users u ON u.idx = h.user_idx
$fn$;

-- Batch k (1-based) of the orders first_order + 1 .., in order.
CREATE FUNCTION bench.batch(first_order bigint, last_order bigint, k bigint, size integer)
    RETURNS bytea[]
    LANGUAGE sql STABLE
AS $fn$
    SELECT array_agg(m.message ORDER BY m.n)
    FROM bench.messages(first_order + (k - 1) * size + 1,
                        least(first_order + k * size, last_order)) m
$fn$;

-- History batches are generated as they are loaded.
CREATE SEQUENCE bench.history_seq;
CREATE FUNCTION bench.history_batch(k bigint) RETURNS bytea[]
    LANGUAGE sql STABLE
AS $fn$
    SELECT bench.batch(0, p.history, k, p.batch) FROM bench.params p
$fn$;

-- Measured batches are generated beforehand: only ingestion is timed.
CREATE SEQUENCE bench.measured_seq;
CREATE TABLE bench.batches (
    k           bigint PRIMARY KEY,
    messages    bytea[] NOT NULL
);

-- Results of every measured call (same transaction as the call).
CREATE TABLE bench.results (
    k           bigint PRIMARY KEY,
    received    integer,
    applied     integer,
    unchanged   integer,
    other_type  integer,
    dead_lettered integer,
    replayed    integer,
    mismatched  integer
);

-- Per-transaction latencies from the pgbench logs.
CREATE TABLE bench.latency (
    phase       text NOT NULL,
    seq         integer NOT NULL,
    usec        bigint NOT NULL,
    PRIMARY KEY (phase, seq)
);
