/*-------------------------------------------------------------------------
 *
 * destroy_hang_plugin.c
 *	  A librdkafka interceptor plugin for tests: rd_kafka_destroy() of a
 *	  client made with it does not return while the file HANG_FILE exists.
 *
 * librdkafka 2.0 has been seen to keep one of its threads for good, and
 * rd_kafka_destroy() to wait for it (src/dwh_kafka_destroy.c); this makes
 * that happen on demand.  It is loaded through the librdkafka property
 * plugin.library.paths in dwh.kafka_options, so dwh's code is the same as
 * in production.  test/t/052_kafka_destroy_hangs.pl builds it with
 * -DHANG_FILE='"path"'.
 *
 *-------------------------------------------------------------------------
 */
#include <unistd.h>

#include <librdkafka/rdkafka.h>

#ifndef HANG_FILE
#error "build with -DHANG_FILE='\"path\"'"
#endif

rd_kafka_resp_err_t conf_init(rd_kafka_conf_t *conf, void **plug_opaquep,
							  char *errstr, size_t errstr_size);

/* Called by rd_kafka_destroy(), in the thread that called it. */
static rd_kafka_resp_err_t
on_destroy(rd_kafka_t *rk, void *ic_opaque)
{
	while (access(HANG_FILE, F_OK) == 0)
		usleep(10000);
	return RD_KAFKA_RESP_ERR_NO_ERROR;
}

static rd_kafka_resp_err_t
on_new(rd_kafka_t *rk, const rd_kafka_conf_t *conf, void *ic_opaque,
	   char *errstr, size_t errstr_size)
{
	return rd_kafka_interceptor_add_on_destroy(rk, "kafka_destroy_hang",
											   on_destroy, NULL);
}

/* The plugin's entry point: librdkafka calls it when the property is set. */
rd_kafka_resp_err_t
conf_init(rd_kafka_conf_t *conf, void **plug_opaquep, char *errstr,
		  size_t errstr_size)
{
	return rd_kafka_conf_interceptor_add_on_new(conf, "kafka_destroy_hang",
												on_new, NULL);
}
