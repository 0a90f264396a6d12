-- A slow probe client: one request every 50 ms on each connection (about 20 req/s with
-- -c1), like a kubelet polling much faster than usual while the proxy is saturated.
wrk.path = "/readyz"

function delay()
  return 50
end
