#ifndef FTS_TOKEND_CLINUX_SHIM_H
#define FTS_TOKEND_CLINUX_SHIM_H

// glibc headers and constants that Swift's Glibc module leaves out.
#include <malloc.h>        // malloc_trim(3), for the socket server
#include <sys/signalfd.h>  // signalfd(2), for the daemon's signals

// O_PATH (open(2)) is defined by <fcntl.h> only under _GNU_SOURCE; its value is the kernel's ABI.
#ifndef O_PATH
#define O_PATH 010000000
#endif
static const int clinux_O_PATH = O_PATH;

#endif
