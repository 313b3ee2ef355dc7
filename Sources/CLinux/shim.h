#ifndef FTS_TOKEND_CLINUX_SHIM_H
#define FTS_TOKEND_CLINUX_SHIM_H

// glibc headers that Swift's Glibc module leaves out.
#include <malloc.h>        // malloc_trim(3), for the socket server
#include <sys/signalfd.h>  // signalfd(2), for the daemon's signals

#endif
