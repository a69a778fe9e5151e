"""The door's live dashboard: ``GET /dashboard`` (one page, no outside scripts) and
``GET /dashboard/data`` (what it draws, as JSON, read every 2 s): the engines and the
roles they act in, TTFT and inter-token latency (p90 of each 20 s window) against the
service levels, goodput, the role planner's decisions over time, and the prompt tokens
the engines found in their KV cache by tier. Behind the API key like the door's other
paths but /health."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response

from common.config import SloConfig
from door.door_metrics import DoorMetrics
from door.engine_watch import EngineWatch
from door.routing import RoutingTable


def dashboard_data(table: RoutingTable, watch: EngineWatch, metrics: DoorMetrics, slo: SloConfig) -> dict[str, Any]:
    engines = [{"name": e.name, "role": e.role, "acting": e.acting, "state": e.state, "in_flight": e.outstanding}
               for e in table.all_engines()]  # fmt: skip
    series = [{"t": at, "ttft_p90_ms": levels["ttft_p90_ms"], "itl_p90_ms": levels["itl_p90_ms"],
               "requests": levels["requests"], "met": levels["met"], "window_s": levels["window_s"],
               "goodput_rps": levels["met"] / levels["window_s"], "roles": roles}  # type: ignore[operator]
              for at, levels, roles in watch.series]  # fmt: skip
    kv_tokens: dict[str, float] = defaultdict(float)
    for family in metrics.kv_hit_tokens.collect():
        for sample in family.samples:
            kv_tokens[sample.labels["source"]] += sample.value
    return {"slo": {"ttft_ms": slo.ttft_ms, "itl_ms": slo.itl_ms}, "adaptive": table.adaptive, "engines": engines,
            "series": series, "decisions": watch.decisions, "kv_tokens": dict(kv_tokens)}  # fmt: skip


def add_dashboard_routes(app: FastAPI, table: RoutingTable, watch: EngineWatch, metrics: DoorMetrics,
                         slo: SloConfig) -> None:  # fmt: skip
    @app.get("/dashboard")
    async def dashboard() -> Response:
        return HTMLResponse(PAGE)

    @app.get("/dashboard/data")
    async def data() -> Response:
        return JSONResponse(dashboard_data(table, watch, metrics, slo))


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>vLLM on openYuanrong</title>
<style>
body{font:14px system-ui,sans-serif;margin:16px;color:#222}h1{font-size:18px}h2{font-size:15px;margin:14px 0 4px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
.prefill{background:#fde2c8}.decode{background:#cfe3fb}.colocated{background:#d9f2d9}
svg{border:1px solid #ddd;background:#fafafa}.row{display:flex;gap:16px;flex-wrap:wrap}
#decisions li{margin:2px 0}.muted{color:#777}
</style></head><body>
<h1>vLLM on openYuanrong: <span id="summary">loading</span></h1>
<div class="row">
<div><h2>Engines</h2><table id="engines"><thead><tr><th>engine</th><th>role</th><th>acting as</th><th>state</th>
<th>in flight</th></tr></thead><tbody></tbody></table>
<h2>KV prompt tokens by tier</h2><table id="kv"><tbody></tbody></table></div>
<div><h2>TTFT p90 (ms) and its level</h2><svg id="ttft" width="520" height="160"></svg>
<h2>Inter-token latency p90 (ms) and its level</h2><svg id="itl" width="520" height="160"></svg>
<h2>Goodput (answers/s meeting both levels)</h2><svg id="goodput" width="520" height="120"></svg></div>
</div>
<h2>Role planner decisions</h2><ol id="decisions"></ol>
<script>
const NS="http://www.w3.org/2000/svg";
function el(tag,attrs,text){const e=document.createElementNS(NS,tag);for(const k in attrs)e.setAttribute(k,attrs[k]);
 if(text!==undefined)e.textContent=text;return e}
function chart(svg,series,key,level,decisions,color){
 while(svg.firstChild)svg.removeChild(svg.firstChild);
 const w=+svg.getAttribute("width"),h=+svg.getAttribute("height"),pad=34;
 if(!series.length){svg.appendChild(el("text",{x:pad,y:h/2,class:"muted"},"no answers yet"));return}
 const t0=series[0].t,t1=Math.max(series[series.length-1].t,t0+1);
 const top=Math.max(level||0,...series.map(p=>p[key]))*1.15||1;
 const x=t=>pad+(t-t0)/(t1-t0)*(w-pad-6),y=v=>h-18-v/top*(h-28);
 svg.appendChild(el("text",{x:2,y:12,"font-size":10},top.toFixed(top<10?2:0)));
 svg.appendChild(el("text",{x:2,y:h-18,"font-size":10},"0"));
 for(const d of decisions){if(d.at>=t0&&Object.keys(d.moved).length){
  svg.appendChild(el("line",{x1:x(d.at),x2:x(d.at),y1:4,y2:h-18,stroke:"#999","stroke-dasharray":"3 3",class:"decision"}))}}
 if(level){svg.appendChild(el("line",{x1:pad,x2:w-6,y1:y(level),y2:y(level),stroke:"#c00",class:"level"}));
  svg.appendChild(el("text",{x:w-70,y:y(level)-3,"font-size":10,fill:"#c00"},"level "+level))}
 svg.appendChild(el("polyline",{points:series.map(p=>x(p.t)+","+y(p[key])).join(" "),fill:"none",stroke:color,
  "stroke-width":2,class:"series"}));
 svg.appendChild(el("text",{x:pad,y:h-4,"font-size":10},new Date(t0*1000).toLocaleTimeString()));
 svg.appendChild(el("text",{x:w-60,y:h-4,"font-size":10},new Date(t1*1000).toLocaleTimeString()))}
function row(cells,cls){const tr=document.createElement("tr");cells.forEach((c,i)=>{const td=document.createElement("td");
 td.textContent=c;if(i===2&&cls)td.className=cls;tr.appendChild(td)});return tr}
async function refresh(){
 let data;try{data=await (await fetch("/dashboard/data")).json()}catch(e){
  document.getElementById("summary").textContent="door unreachable";return}
 const last=data.series[data.series.length-1];
 document.getElementById("summary").textContent=data.engines.length+" engines"+(data.adaptive?", adaptive roles":"")+
  (last?", goodput "+last.goodput_rps.toFixed(2)+" req/s ("+last.met+" of "+last.requests+" answers met both levels)":"");
 const body=document.querySelector("#engines tbody");body.replaceChildren(...data.engines.map(e=>
  row([e.name,e.role,e.acting,e.state,e.in_flight],e.acting)));
 document.querySelector("#kv tbody").replaceChildren(...Object.entries(data.kv_tokens).map(([k,v])=>row([k,v])));
 chart(document.getElementById("ttft"),data.series,"ttft_p90_ms",data.slo.ttft_ms,data.decisions,"#1f6fd1");
 chart(document.getElementById("itl"),data.series,"itl_p90_ms",data.slo.itl_ms,data.decisions,"#8a3ad1");
 chart(document.getElementById("goodput"),data.series,"goodput_rps",0,data.decisions,"#1a9a3a");
 document.getElementById("decisions").replaceChildren(...data.decisions.slice(-20).reverse().map(d=>{
  const li=document.createElement("li");const moved=Object.entries(d.moved).map(([n,m])=>n+" "+m[0]+" \\u2192 "+m[1]);
  li.textContent=new Date(d.at*1000).toLocaleTimeString()+" "+(moved.join(", ")||"advice")+": "+d.reason;return li}))}
refresh();setInterval(refresh,2000);
</script></body></html>
"""
