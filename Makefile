# dwh: PGXS build of the extension, its install script and its tests.

EXTENSION = dwh
EXTVERSION = 1.1
MODULE_big = dwh

OBJS = \
	src/dwh.o \
	src/dwh_settings.o \
	src/dwh_uuid.o \
	src/dwh_version.o \
	src/dwh_timestamp.o \
	src/dwh_message.o \
	src/dwh_spi.o \
	src/dwh_stg_guard.o \
	src/dwh_locks.o \
	src/dwh_key_probe.o \
	src/dwh_references.o \
	src/dwh_replan.o \
	src/dwh_session_mode.o \
	src/dwh_trust.o \
	src/dwh_order_keys.o \
	src/dwh_columns.o \
	src/dwh_dead_letter.o \
	src/dwh_ingest_session.o \
	src/dwh_inflight.o \
	src/dwh_ingest.o \
	src/dwh_ingest_sql.o \
	src/dwh_secret_scan.o \
	src/dwh_secrets.o \
	src/dwh_secret_files.o \
	src/dwh_status.o \
	src/dwh_worker.o \
	src/dwh_kafka_options.o \
	src/dwh_kafka_hide.o \
	src/dwh_kafka_consumer.o \
	src/dwh_kafka_offsets.o \
	src/dwh_kafka_verify.o \
	src/dwh_kafka_worker.o \
	src/dwh_kafka_destroy.o \
	src/dwh_kafka_partitions.o \
	src/dwh_kafka_probe.o \
	src/dwh_kafka_producer.o \
	src/dwh_kafka_queue.o \
	src/dwh_tag_feed.o \
	src/dwh_tags_worker.o \
	src/dwh_redis_glob.o \
	src/dwh_redis_url.o \
	src/dwh_redis_conn.o \
	src/dwh_redis_store.o \
	src/dwh_redis_worker.o

SHLIB_LINK = -lrdkafka -lhiredis
PG_CPPFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter -Wno-sign-compare \
	-Wno-missing-field-initializers -DDWH_EXTVERSION='"$(EXTVERSION)"'

# The install script of the current version is assembled from one file per
# concern under install/.  update/ holds the full scripts of released
# versions, frozen as they were released, and the update scripts between
# versions, which ALTER EXTENSION dwh UPDATE runs (docs/upgrades.md).
INSTALL_PARTS = $(sort $(wildcard install/*.sql))
DATA_built = $(EXTENSION)--$(EXTVERSION).sql
DATA = $(sort $(wildcard update/$(EXTENSION)--*.sql))

REGRESS = $(basename $(notdir $(sort $(wildcard sql/*.sql))))
REGRESS_OPTS = --temp-instance=./tmp_check --temp-config=test/regress.conf --encoding=UTF8

ISOLATION = $(basename $(notdir $(sort $(wildcard test/isolation/specs/*.spec))))
ISOLATION_OPTS = --temp-instance=./tmp_check_iso --temp-config=test/regress.conf --encoding=UTF8 \
	--inputdir=test/isolation --outputdir=test/isolation/results

TAP_TESTS = 1
PROVE_TESTS = test/t/*.pl

EXTRA_CLEAN = tmp_check tmp_check_iso test/isolation/results

PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# Each TAP file's time in the log, to see where the suite's time goes.
PROVE_FLAGS += --timer

# CREATE EXTENSION dwh installs default_version: the version this build's
# install script and library are (the library compares it with the schema
# it finds, see src/dwh_version.c).
CONTROL_VERSION := $(shell sed -n "s/^default_version = '\(.*\)'$$/\1/p" $(EXTENSION).control)
ifneq ($(CONTROL_VERSION),$(EXTVERSION))
$(error $(EXTENSION).control says default_version '$(CONTROL_VERSION)', the Makefile EXTVERSION $(EXTVERSION))
endif
src/dwh_version.o: Makefile

$(EXTENSION)--$(EXTVERSION).sql: $(INSTALL_PARTS)
	cat $^ > $@
