"""The chat service past one machine: replicas of it on Ray Serve, one per GPU.

- :mod:`cluster.deployment` the Serve deployment: one :class:`chat.session.ChatService` per
  replica, built from a factory it is given (the command line passes the bot's), continuous
  batching inside the replica's engine;
- :mod:`cluster.serve` starting, scaling and stopping the deployment on a Ray cluster;
- :mod:`cluster.client` :class:`~cluster.client.RemoteChat`, what a front end uses in place of a
  chat service: each call goes through a deployment handle, routed by channel;
- :mod:`cluster.standalone` a service factory from a model file and a store, without the bot's
  settings (benchmarks, tests); :mod:`cluster.bench` throughput by number of replicas.

A channel sticks to one replica: Ray Serve's consistent-hash request router keys each request by
its channel id (the handle's ``session_id``) on a ring with virtual nodes, so adding a fourth
replica to three moves about a quarter of the channels. The channel's lease in the shared store
fences its writes (:mod:`chat.states`), so a replica that lost a channel can never overwrite the
newer conversation.
"""
