#!/usr/bin/env python3
# The module graph of one crate (docs/modules.md): which module imports which.
# Usage: scripts/module-graph.py daemon/src
import re,os,glob,sys
def graph(root, crate_prefix):
    def modname(path):
        rel=os.path.relpath(path,root)[:-3]
        if rel.endswith('/mod'): rel=rel[:-4]
        if rel in ('lib','main'): return rel
        return rel.replace('/','::')
    def exists(mod):
        p=root+'/'+mod.replace('::','/')
        return os.path.exists(p+'.rs') or os.path.exists(p+'/mod.rs')
    def expand(path):
        # expand brace groups: a::{b, c::d} -> [a::b, a::c::d]
        m=re.match(r'^(.*?)\{(.*)\}$',path.strip())
        if not m: return [path.strip()]
        pre=m.group(1); inner=m.group(2)
        parts=[];depth=0;cur=''
        for ch in inner:
            if ch=='{': depth+=1
            if ch=='}': depth-=1
            if ch==',' and depth==0: parts.append(cur);cur=''
            else: cur+=ch
        parts.append(cur)
        out=[]
        for p in parts:
            p=p.strip()
            if p: out+=expand(pre+p)
        return out
    edges={}
    files=glob.glob(root+'/**/*.rs',recursive=True)
    # Where each public item is defined, for names re-exported at the crate root.
    defined={}
    for f in files:
        for name in re.findall(r'^pub (?:struct|enum|type|fn|const|trait|static) ([A-Za-z_][A-Za-z0-9_]*)',open(f).read(),re.M):
            defined.setdefault(name,[]).append(modname(f))
    # A name defined in several modules means the one the crate root re-exports.
    root_src=open(root+'/lib.rs').read() if os.path.exists(root+'/lib.rs') else ''
    reexported=set(re.findall(r'^pub use ([a-z_]+)::',root_src,re.M))
    def owner(name):
        mods=defined.get(name,[])
        for mod in mods:
            if mod in reexported:
                return mod
        return mods[0] if mods else 'lib'
    for f in files:
        m=modname(f)
        src=open(f).read()
        # Comments name modules without importing them.
        src=re.sub(r'//[^\n]*','',src)
        i=src.find('#[cfg(test)]\nmod tests'); 
        if i>=0: src=src[:i]
        deps=set()
        is_modrs=f.endswith('/mod.rs') or f.endswith('lib.rs') or f.endswith('main.rs')
        # `super` is the parent module, for a `mod.rs` as for any other file.
        base = m.rsplit('::',1)[0] if '::' in m else ''
        for u in re.findall(r'^\s*(?:pub(?:\([^)]*\))?\s+)?use\s+([^;]+);',src,re.M):
            for p in expand(u.replace('\n',' ')):
                p=re.sub(r'\s+as\s+\w+$','',p)
                segs=[x.strip() for x in p.split('::')]
                if segs[0]=='crate': path=segs[1:]
                elif is_modrs and exists(((m+'::') if m not in ('lib','main') else '')+segs[0]):
                    path=(m.split('::') if m not in ('lib','main') else [])+segs
                elif segs[0]=='super':
                    path=(base.split('::') if base and base not in ('lib','main') else [])+segs[1:]
                    if base=='' : path=segs[1:]
                else: continue
                # longest prefix that is a module
                best=None
                for k in range(len(path),0,-1):
                    cand='::'.join(path[:k])
                    if exists(cand): best=cand;break
                if best is None:
                    best=owner(path[0]) if path else 'lib'
                if best!=m: deps.add(best)
        # inline super:: paths
        for mm in re.findall(r'(?<![:\w])super::((?:[a-z_]+::)*[a-z_]+)',src):
            path=(base.split('::') if base else [])+mm.split('::')
            for k in range(len(path),0,-1):
                cand='::'.join(path[:k])
                if exists(cand):
                    if cand!=m: deps.add(cand)
                    break
        # inline paths into a child module, from a mod.rs or lib.rs
        if is_modrs:
            prefix=(m+'::') if m not in ('lib','main') else ''
            for mm in re.findall(r'(?<![:\w])([a-z_]+)::',src):
                if mm not in ('crate','super','self','std','core','alloc') and exists(prefix+mm):
                    deps.add(prefix+mm)
        # inline crate:: paths
        for mm in re.findall(r'crate::((?:[a-z_]+::)*[a-z_]+)',src):
            path=mm.split('::')
            for k in range(len(path),0,-1):
                cand='::'.join(path[:k])
                if exists(cand):
                    if cand!=m: deps.add(cand)
                    break
        if m in ('lib',): deps={d for d in deps}
        edges[m]=sorted(d for d in deps if d not in ('lib',))
    return edges
root=sys.argv[1]
e=graph(root,'')
for m in sorted(e):
    print(f"- `{m}` → " + (", ".join(f"`{d}`" for d in e[m]) if e[m] else "—"))
# Any circle is an error: the graph must be one-way.
def find_cycle():
    state={}
    def visit(n,stack):
        state[n]=1; stack.append(n)
        for d in e.get(n,[]):
            if state.get(d)==1: return stack[stack.index(d):]+[d]
            if d not in state:
                c=visit(d,stack)
                if c: return c
        state[n]=2; stack.pop(); return None
    for n in e:
        if n not in state:
            c=visit(n,[])
            if c: return c
cycle=find_cycle()
if cycle:
    sys.exit("circle: "+" -> ".join(cycle))
