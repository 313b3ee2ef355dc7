#ifndef FTS_TOKEND_CSYSTEMD_SHIM_H
#define FTS_TOKEND_CSYSTEMD_SHIM_H

// The part of libsystemd (sd-daemon(3), sd-journal(3)) that the Systemd module uses.
// Swift cannot call C variadic functions, so journald logging goes through sd_journal_sendv.
#include <systemd/sd-daemon.h>
#include <systemd/sd-journal.h>

#endif
