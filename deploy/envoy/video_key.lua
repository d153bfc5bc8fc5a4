-- Framewise video affinity: the routing key of a chat completion or job request is its first video.
--
-- Follow-up questions about one video should reach the replica that already holds its bytes, its decoded
-- frames and (in vLLM's prefix cache) its video tokens. This filter reads the request body once and sets
-- x-framewise-video-key from the first `video_url` part: a `file-<id>` as it is, an http(s) URL without
-- its fragment and without the query parameters that only sign or expire it (so a re-signed URL of the
-- same object keeps its key), or a `data:` URL's length and a hash of its first 64 KiB. The route hashes on
-- the header (ring hash with bounded load); a request without it goes to the least-loaded replica.
--
-- Never refuses anything: bodies over MAX_SCAN (or without Content-Length) are not buffered and go on
-- without a key, and a body that is not JSON, or has no video, goes on unchanged; the gateway answers it.

local KEY = "x-framewise-video-key"
local MAX_SCAN = 8 * 1024 * 1024 -- keep per_connection_buffer_limit_bytes at least this (envoy.yaml)
local DATA_PREFIX_BYTES = 64 * 1024
local ROUTED = { ["/v1/chat/completions"] = true, ["/v1/jobs"] = true }

-- query parameters that sign, authorize or expire a URL (S3, GCS, Azure SAS, CloudFront, Akamai, generic)
local VOLATILE_PREFIXES = { "x-amz-", "x-goog-", "x-ms-" }
local VOLATILE = {}
for _, name in ipairs({ "signature", "expires", "key-pair-id", "policy", "sig", "se", "st", "sp", "sv", "sr",
                        "spr", "skoid", "sktid", "skt", "ske", "sks", "skv", "token", "access_token", "auth",
                        "auth_key", "hdnts", "hdnea", "__gda__", "verify", "googleaccessid" }) do
  VOLATILE[name] = true
end

local function fnv1a(s)
  -- 32-bit FNV-1a without bit operations beyond xor: h * 16777619 = h * 403 + (h mod 256) * 2^24 (mod 2^32)
  local h = 2166136261
  for i = 1, #s do
    h = bit.bxor(h, s:byte(i)) % 4294967296
    h = (h * 403 + (h % 256) * 16777216) % 4294967296
  end
  return string.format("%08x", h)
end

local ESCAPES = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }

-- the JSON string starting with the quote at s[i]: its decoded text (\uXXXX kept as written), or nil
local function json_string(s, i)
  local parts, j = {}, i + 1
  while true do
    local k = s:find('["\\]', j)
    if not k then return nil end
    parts[#parts + 1] = s:sub(j, k - 1)
    if s:sub(k, k) == '"' then return table.concat(parts) end
    local e = s:sub(k + 1, k + 1)
    if ESCAPES[e] then
      parts[#parts + 1] = ESCAPES[e]
      j = k + 2
    elseif e == "u" then
      parts[#parts + 1] = s:sub(k, k + 5)
      j = k + 6
    else
      return nil
    end
  end
end

-- the `url` of the first `"video_url": {...}` object; an unescaped `"video_url"` followed by a colon is
-- always a key (inside JSON strings quotes are escaped)
local function first_video_url(body)
  local _, open = body:find('"video_url"%s*:%s*{')
  if not open then return nil end
  local at, quote = body:find('[{,]%s*"url"%s*:%s*"', open)
  if not at then return nil end
  local close = body:find("}", open, true)
  if close and close < at then return nil end -- this video_url object has no url
  return json_string(body, quote)
end

local function stable_url(url)
  local base, query = url:match("^([^?#]*)%??([^#]*)")
  local scheme_host, path = base:match("^(%a[%w+.-]*://[^/]*)(.*)$")
  if scheme_host then base = scheme_host:lower() .. path end
  local kept = {}
  for pair in query:gmatch("[^&]+") do
    local name = (pair:match("^([^=]*)") or ""):lower()
    local volatile = VOLATILE[name]
    for _, prefix in ipairs(VOLATILE_PREFIXES) do
      if name:sub(1, #prefix) == prefix then volatile = true end
    end
    if not volatile then kept[#kept + 1] = pair end
  end
  return #kept > 0 and (base .. "?" .. table.concat(kept, "&")) or base
end

-- the routing key of a request body, or nil (exported for tests through FRAMEWISE_VIDEO_KEY)
function framewise_video_key(body)
  local url = first_video_url(body)
  if not url or url == "" then return nil end
  if url:match("^file%-[%w_-]+$") then return url end
  if url:sub(1, 5):lower() == "data:" then
    return "data-" .. #url .. "-" .. fnv1a(url:sub(1, DATA_PREFIX_BYTES))
  end
  return "url-" .. fnv1a(stable_url(url))
end

function envoy_on_request(handle)
  local headers = handle:headers()
  headers:remove(KEY) -- the proxy's to set, never the client's
  local path = (headers:get(":path") or ""):match("^[^?]*")
  if headers:get(":method") ~= "POST" or not ROUTED[path] then return end
  local length = tonumber(headers:get("content-length") or "")
  if not length or length == 0 or length > MAX_SCAN then return end
  local body = handle:body()
  if not body then return end
  local ok, key = pcall(framewise_video_key, body:getBytes(0, body:length()))
  if ok and key then
    handle:headers():add(KEY, key) -- a fresh handle: the one above does not outlive the wait for the body
    handle:clearRouteCache() -- the route that hashes on the key matches now
  elseif not ok then
    handle:logWarn("framewise video key: " .. tostring(key))
  end
end
