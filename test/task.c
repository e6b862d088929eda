/* The test runner and socket helpers of test/task.h. */
#include "task.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <netinet/in.h>
#include <unistd.h>

int task_failed;

int task_run(const char *area, const task_t *tasks, size_t n, int argc,
             char **argv) {
  int passed = 0;
  int failed = 0;
  size_t i;
  int j;

  for (i = 0; i < n; i++) {
    int selected = argc < 2;
    for (j = 1; j < argc; j++) {
      selected |= strcmp(argv[j], tasks[i].name) == 0;
    }
    if (!selected) {
      continue;
    }
    task_failed = 0;
    tasks[i].fn();
    fprintf(stderr, "%s %s\n", task_failed ? "FAIL" : "ok  ", tasks[i].name);
    if (task_failed) {
      failed++;
    } else {
      passed++;
    }
  }
  printf("%s: %d passed, %d failed\n", area, passed, failed);
  return failed > 0 || passed == 0 ? 1 : 0;
}

void task_addr(int family, int port, struct sockaddr_storage *ss) {
  memset(ss, 0, sizeof(*ss));
  if (family == AF_INET6) {
    uv_ip6_addr("::1", port, (struct sockaddr_in6 *) ss);
  } else {
    uv_ip4_addr("127.0.0.1", port, (struct sockaddr_in *) ss);
  }
}

int task_listen_tcp(int family, int *port) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);
  int one = 1;
  int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);

  if (fd < 0) {
    return -1;
  }
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  task_addr(family, 0, &ss);
  if (bind(fd, (struct sockaddr *) &ss,
           family == AF_INET6 ? sizeof(struct sockaddr_in6)
                              : sizeof(struct sockaddr_in)) != 0 ||
      listen(fd, 128) != 0 ||
      getsockname(fd, (struct sockaddr *) &ss, &len) != 0) {
    close(fd);
    return -1;
  }
  *port = ntohs(family == AF_INET6 ? ((struct sockaddr_in6 *) &ss)->sin6_port
                                   : ((struct sockaddr_in *) &ss)->sin_port);
  return fd;
}

int task_connect_tcp(int family, int port) {
  struct sockaddr_storage ss;
  int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);

  task_addr(family, port, &ss);
  if (fd < 0 || connect(fd, (struct sockaddr *) &ss,
                        family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                           : sizeof(struct sockaddr_in)) != 0) {
    if (fd >= 0) {
      close(fd);
    }
    return -1;
  }
  return fd;
}

ac_map_t *task_map_new(void) {
  uv_loop_t *loop = malloc(sizeof(*loop));
  ac_map_t *map = NULL;

  if (loop == NULL || uv_loop_init(loop) != 0) {
    free(loop);
    return NULL;
  }
  if (ac_map_new(loop, &map) != 0) {
    uv_loop_close(loop);
    free(loop);
    return NULL;
  }
  return map;
}

void task_map_free(ac_map_t *map) {
  uv_loop_t *loop;

  if (map == NULL) {
    return;
  }
  loop = ac_map_loop(map);
  ac_map_free(map);
  if (uv_loop_close(loop) != 0) {
    fprintf(stderr, "task_map_free: loop still has handles\n");
    abort();
  }
  free(loop);
}

int task_read_to_error(int fd) {
  static char sink[65536];
  struct pollfd p = {.fd = fd, .events = POLLIN};

  while (poll(&p, 1, 5000) == 1) {
    ssize_t n = recv(fd, sink, sizeof(sink), MSG_DONTWAIT);
    if (n == 0) {
      return 0;
    }
    if (n < 0 && errno != EAGAIN) {
      return errno;
    }
  }
  return ETIMEDOUT;
}

int task_fd_count(void) {
  DIR *dir = opendir("/proc/self/fd");
  struct dirent *e;
  int n = 0;

  if (dir == NULL) {
    return -1;
  }
  while ((e = readdir(dir)) != NULL) {
    n += e->d_name[0] != '.';
  }
  closedir(dir);
  return n - 1; /* the directory's own fd */
}
