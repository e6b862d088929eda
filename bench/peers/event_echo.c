/* event_echo: a libevent bufferevent echo server.
 *
 * Usage: event_echo PORT
 *
 * An evconnlistener accepts on 127.0.0.1:PORT; each connection is a
 * bufferevent whose read callback moves its whole input buffer to its output
 * buffer. Exits 0 on SIGINT or SIGTERM.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>

/* Echoes: moves everything read to the output buffer (no copy). */
static void on_read(struct bufferevent *bev, void *arg) {
  (void)arg;
  bufferevent_write_buffer(bev, bufferevent_get_input(bev));
}

/* Frees the connection on EOF or error. */
static void on_event(struct bufferevent *bev, short what, void *arg) {
  (void)arg;
  if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR)) {
    bufferevent_free(bev);
  }
}

/* Wraps an accepted socket in a bufferevent and enables reading. */
static void on_accept(struct evconnlistener *lis, evutil_socket_t fd,
                      struct sockaddr *sa, int salen, void *arg) {
  struct event_base *base = evconnlistener_get_base(lis);
  struct bufferevent *bev;

  (void)sa;
  (void)salen;
  (void)arg;
  bev = bufferevent_socket_new(base, fd, BEV_OPT_CLOSE_ON_FREE);
  if (bev == NULL) {
    evutil_closesocket(fd);
    return;
  }
  bufferevent_setcb(bev, on_read, NULL, on_event, NULL);
  bufferevent_enable(bev, EV_READ | EV_WRITE);
}

/* Stops the loop on SIGINT or SIGTERM. */
static void on_signal(evutil_socket_t sig, short what, void *arg) {
  (void)sig;
  (void)what;
  event_base_loopbreak(arg);
}

/* Binds a listener to 127.0.0.1:port; returns NULL on failure. */
static struct evconnlistener *listen_on(struct event_base *base, int port) {
  struct sockaddr_in addr;

  memset(&addr, 0, sizeof(addr));
  addr.sin_family = AF_INET;
  addr.sin_port = htons((unsigned short)port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return evconnlistener_new_bind(base, on_accept, NULL,
                                 LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_FREE,
                                 4096, (struct sockaddr *)&addr,
                                 sizeof(addr));
}

/* Parses the port, listens, dispatches until a signal arrives. */
int main(int argc, char **argv) {
  struct event_base *base;
  struct evconnlistener *lis;
  struct event *sigint, *sigterm;

  if (argc != 2) {
    fprintf(stderr, "usage: %s PORT\n", argv[0]);
    return 2;
  }
  base = event_base_new();
  lis = base != NULL ? listen_on(base, atoi(argv[1])) : NULL;
  if (lis == NULL) {
    perror("event_echo: listen");
    return 1;
  }
  sigint = evsignal_new(base, SIGINT, on_signal, base);
  sigterm = evsignal_new(base, SIGTERM, on_signal, base);
  event_add(sigint, NULL);
  event_add(sigterm, NULL);
  event_base_dispatch(base);
  event_free(sigint);
  event_free(sigterm);
  evconnlistener_free(lis);
  event_base_free(base);
  return 0;
}
