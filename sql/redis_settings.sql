-- Redis settings and the validation of dwh.redis_url: clear messages that
-- never quote the value (it may hold a password).  (The worker against a
-- real Redis is tested in test/t/.)
\set ECHO none
\i test/regress_helpers.sql
\set ECHO all

-- Defaults.
SHOW dwh.redis_url;
SHOW dwh.redis_refresh_interval;
SHOW dwh.redis_batch_size;
SHOW dwh.redis_scan_pattern;
SHOW dwh.redis_key_pattern;
SHOW dwh.redis_max_value_size;
SHOW dwh.redis_timeout;

-- Accepted forms.
ALTER SYSTEM SET dwh.redis_url = 'redis://localhost';
ALTER SYSTEM SET dwh.redis_url = 'redis://:secret-pw@127.0.0.1:6380/2';
ALTER SYSTEM SET dwh.redis_url = 'redis://dwh:secret-pw@[::1]:6380';
ALTER SYSTEM SET dwh.redis_url = 'redis://:p%40ss:w@rd@redis.example.com/';
ALTER SYSTEM SET dwh.redis_url = '/run/redis/redis.sock';
ALTER SYSTEM SET dwh.redis_url = 'unix://:secret-pw@/run/redis/redis.sock?db=3';
-- A socket path may hold '@' (systemd's redis@instance units).
ALTER SYSTEM SET dwh.redis_url = 'unix:///run/redis@main/redis.sock';
ALTER SYSTEM SET dwh.redis_url = 'unix://:secret-pw@/run/redis@main/redis.sock?db=1';
ALTER SYSTEM SET dwh.redis_url = '/run/redis@main/redis.sock';

-- Refused, without quoting any part of the value.
ALTER SYSTEM SET dwh.redis_url = 'secret-pw';
ALTER SYSTEM SET dwh.redis_url = 'rediss://:secret-pw@host';
ALTER SYSTEM SET dwh.redis_url = 'redis://:secret-pw@';
ALTER SYSTEM SET dwh.redis_url = 'redis://:secret-pw@host:0';
ALTER SYSTEM SET dwh.redis_url = 'redis://:secret-pw@host:6379x';
ALTER SYSTEM SET dwh.redis_url = 'redis://:secret-pw@host/db1';
ALTER SYSTEM SET dwh.redis_url = 'redis://:secret-pw@host/1?timeout=5';
ALTER SYSTEM SET dwh.redis_url = 'redis://secret-pw@host';
ALTER SYSTEM SET dwh.redis_url = 'redis://:secret%zz@host';
ALTER SYSTEM SET dwh.redis_url = 'redis://[::1:6379';
ALTER SYSTEM SET dwh.redis_url = 'unix://:secret-pw@relative.sock';
ALTER SYSTEM SET dwh.redis_url = 'unix:///run/redis.sock?timeout=1';
ALTER SYSTEM SET dwh.redis_url = 'unix://secret-pw@/run/redis@main/redis.sock';
ALTER SYSTEM RESET dwh.redis_url;
-- Key patterns the worker could not match as Redis does, and one it can.
ALTER SYSTEM SET dwh.redis_key_pattern = '';
ALTER SYSTEM SET dwh.redis_key_pattern = '[0-9';
ALTER SYSTEM SET dwh.redis_key_pattern = '[0-]*';
ALTER SYSTEM SET dwh.redis_key_pattern = 'user:\';
ALTER SYSTEM SET dwh.redis_key_pattern = '[a-é]*';
ALTER SYSTEM SET dwh.redis_key_pattern = '[0-9a-f]*\[\]';
ALTER SYSTEM SET dwh.redis_max_value_size = 100;
ALTER SYSTEM SET dwh.redis_timeout = '10min 1s';
ALTER SYSTEM RESET ALL;

-- The worker idles, and says why, while no URL is set.
DO $$
BEGIN
    FOR i IN 1..100 LOOP
        EXIT WHEN EXISTS (SELECT FROM dwh.status WHERE worker = 'redis' AND state LIKE 'idle%');
        PERFORM pg_sleep(0.1);
    END LOOP;
END
$$;
SELECT worker, pid IS NOT NULL AS running, state, keys_mirrored, keys_missing,
       refreshes, changes_found, partitions, messages
FROM dwh.status WHERE worker = 'redis';

-- The URL is for superusers only.
CREATE ROLE regress_dwh_redis;
SET ROLE regress_dwh_redis;
SHOW dwh.redis_url;
SELECT count(*) FROM pg_settings WHERE name = 'dwh.redis_url';
SHOW dwh.redis_refresh_interval;
SELECT count(*) FROM dwh.redis_keys;
RESET ROLE;
DROP ROLE regress_dwh_redis;

-- The queue of ids new to DDS fills from the hubs, whoever writes them.
SELECT t.set_user('u-1', 'One', 'one', '2023-01-01 00:00:00');
SELECT t.load(1, 'u-2', 'CLOSED', '2023-01-01 10:00:00', 'd-1:Dish');
SELECT key, kind FROM dwh.redis_wanted ORDER BY key;
