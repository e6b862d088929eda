/* Command-line numbers for the examples (servers and client alike). */
#ifndef AC_EXAMPLES_ARGS_H
#define AC_EXAMPLES_ARGS_H

#include <errno.h>
#include <stdlib.h>

/* A whole number from lo to hi; -1 when malformed or out of range ("80x",
 * "70000"), where atoi would read a port 80, or 0: any free port. */
static inline long parse_long(const char *s, long lo, long hi) {
  char *end;
  long v;

  errno = 0;
  v = strtol(s, &end, 10);
  return errno == 0 && end != s && *end == '\0' && v >= lo && v <= hi ? v
                                                                      : -1;
}

/* A TCP port, 1 to 65535; -1 when malformed. */
static inline int parse_port(const char *s) {
  return (int) parse_long(s, 1, 65535);
}

#endif
